//! A TCP proxy the test controls, to cut the network between the publisher and a server and
//! restore it, or to leave connections open but silent, without external tools.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct TcpProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut: open connections end when it changes.
    generation: watch::Sender<u64>,
    /// Bumped on every freeze: open connections stop forwarding but stay open.
    freezes: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let (freezes, _) = watch::channel(0u64);
        let (flag, generations, frozen) = (cut.clone(), generation.clone(), freezes.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut ended = generations.subscribe();
                let mut freeze = frozen.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = ended.changed() => {}
                        _ = freeze.changed() => {
                            // Nothing passes any more, and neither end hears that: a black hole.
                            // The sockets stay open until a cut or the proxy's end.
                            let _ = ended.changed().await;
                        }
                    }
                    // Dropping both sockets closes them: the network is gone.
                });
            }
        });
        TcpProxy {
            port,
            cut,
            generation,
            freezes,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every open connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Open connections go silent without closing; new ones pass as before.
    pub fn freeze_open_connections(&self) {
        self.freezes.send_modify(|f| *f += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Ends frozen connections too.
        self.generation.send_modify(|g| *g += 1);
        self.task.abort();
    }
}

/// A proxy in front of a NATS server that loses one publish on its way there: the first whose
/// headers contain `marker`. It stands for a message lost in flight — as a JetStream cluster can
/// lose one in a stream leader change — while the publishes after it arrive.
pub struct NatsLossyProxy {
    port: u16,
    dropped: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl NatsLossyProxy {
    pub async fn start(upstream: u16, marker: &'static str) -> NatsLossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (client_read, mut client_write) = client.into_split();
                    let (mut server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = forward_losing_one(client_read, server_write, marker, &flag) => {}
                        _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
                    }
                });
            }
        });
        NatsLossyProxy {
            port,
            dropped,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the marked publish has been lost yet.
    pub fn dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for NatsLossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies the client's protocol to the server, frame by frame (`HPUB subject [reply] hdr_len
/// total_len` and `PUB subject [reply] len` carry a body), leaving out the first `HPUB` whose
/// headers contain `marker`.
async fn forward_losing_one(
    client: tokio::net::tcp::OwnedReadHalf,
    server: tokio::net::tcp::OwnedWriteHalf,
    marker: &str,
    dropped: &AtomicBool,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut reader = tokio::io::BufReader::new(client);
    let mut writer = tokio::io::BufWriter::new(server);
    let mut line = Vec::new();
    let mut body = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let mut words = text.split_whitespace();
        let verb = words.next().unwrap_or_default().to_ascii_uppercase();
        let numbers: Vec<usize> = words.filter_map(|w| w.parse().ok()).collect();
        let (body_len, header_len) = match (verb.as_str(), numbers.as_slice()) {
            ("HPUB", [.., header, total]) => (Some(*total), *header),
            ("PUB", [.., total]) => (Some(*total), 0),
            _ => (None, 0),
        };
        let mut lose = false;
        if let Some(len) = body_len {
            body.resize(len + 2, 0);
            reader.read_exact(&mut body).await?;
            let headers = String::from_utf8_lossy(&body[..header_len.min(len)]);
            lose = !dropped.load(Ordering::SeqCst) && headers.contains(marker);
        }
        if lose {
            dropped.store(true, Ordering::SeqCst);
        } else {
            writer.write_all(&line).await?;
            if body_len.is_some() {
                writer.write_all(&body).await?;
            }
        }
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

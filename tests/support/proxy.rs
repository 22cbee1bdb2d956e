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

//! The Docker and Kubernetes examples cannot run here (no Docker engine), so they are kept
//! honest by reading: the YAML parses, the pieces the README promises are there, and the
//! arguments, environment and config file they give outbox-cdc are accepted by the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join(path)).expect("read example");
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|items| {
            items
                .iter()
                .map(|i| i.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `outbox-cdc <args> --print-config` with exactly `env`: must succeed; returns the output.
fn print_config(args: &[String], env: &[(String, String)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
        .args(args)
        .arg("--print-config")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run outbox-cdc");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{args:?} {env:?}: {text}");
    text
}

#[test]
fn docker_compose_runs_the_distributed_demo() {
    let docs = load("docker/docker-compose.yml");
    let services = &docs[0]["services"];
    for name in [
        "postgres",
        "nats",
        "outbox-cdc",
        "outbox-cdc-standby",
        "producer",
        "subscriber",
    ] {
        assert!(!services[name].is_badvalue(), "service {name} is missing");
    }
    assert!(strings(&services["postgres"]["command"]).contains(&"wal_level=logical".to_owned()));
    assert!(strings(&services["nats"]["command"]).contains(&"-js".to_owned()));
    let init = strings(&services["postgres"]["volumes"]);
    let sql = init[0].split(':').next().expect("a host path");
    assert!(
        Path::new(&root().join("docker").join(sql)).exists(),
        "{sql} does not exist"
    );

    for name in ["outbox-cdc", "outbox-cdc-standby"] {
        let service = &services[name];
        let env: Vec<(String, String)> = service["environment"]
            .as_hash()
            .expect("environment map")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_owned(),
                    v.as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let config = print_config(&strings(&service["command"]), &env);
        assert!(config.contains("stream = \"OUTBOX\"  # flag"), "{config}");
        assert!(
            config.contains("http_addr = \"0.0.0.0:9187\"  # flag"),
            "{config}"
        );
        assert!(config.contains("environment (DATABASE_URL)"), "{config}");
        assert!(!config.contains("app-password"), "{config}");
    }
}

/// A health check runs inside its container. The plain `nats` image is the nats-server binary
/// alone (`FROM scratch`): no shell, no wget, no curl, so such a check never passes and nothing
/// that waits for the service to be healthy ever starts.
#[test]
fn compose_health_checks_run_with_what_their_image_has() {
    let docs = load("docker/docker-compose.yml");
    let services = docs[0]["services"].as_hash().expect("services");
    let mut nats_checked = 0;
    for (name, service) in services {
        let name = name.as_str().expect("a service name");
        let image = service["image"].as_str().unwrap_or_default();
        let check = &service["healthcheck"]["test"];
        if check.is_badvalue() {
            continue;
        }
        // The string form and CMD-SHELL run /bin/sh.
        let words = match check.as_str() {
            Some(line) => vec!["CMD-SHELL".to_owned(), line.to_owned()],
            None => strings(check),
        };
        let image_name = image.rsplit('/').next().unwrap_or(image);
        let (repository, tag) = image_name.split_once(':').unwrap_or((image_name, "latest"));
        if repository == "nats" {
            nats_checked += 1;
            if !tag.contains("alpine") {
                let needs = words.iter().find(|w| {
                    let w = w.as_str();
                    w == "CMD-SHELL" || w.contains("wget") || w.contains("curl")
                });
                assert!(
                    needs.is_none(),
                    "service {name}: `{image}` is a scratch image with nats-server alone; its \
                     health check needs {needs:?} (use a `nats:…-alpine` image, whose busybox \
                     has wget)"
                );
            }
        }
    }
    assert!(nats_checked > 0, "the NATS service is health-checked");
}

#[test]
fn the_dockerfile_is_multi_stage_and_runs_as_non_root() {
    let text = std::fs::read_to_string(root().join("docker/Dockerfile")).expect("Dockerfile");
    assert!(text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2);
    assert!(text.contains("USER nonroot"));
    // Every path it copies exists (a wildcard may match nothing, as with BuildKit).
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            if source.contains(['*', '?', '[']) {
                continue;
            }
            assert!(root().join(source).exists(), "COPY {source}: missing");
        }
    }
    // Health and metrics reachable from outside the container, on the port it declares. (`make
    // image-replay` builds the stage and checks the binary takes this variable.)
    let last_stage = text.rsplit("\nFROM ").next().expect("a final stage");
    assert!(
        last_stage.contains("\nENV OUTBOX_CDC_HTTP_ADDR=0.0.0.0:9187\n"),
        "{last_stage}"
    );
    assert!(last_stage.contains("\nEXPOSE 9187\n"), "{last_stage}");
}

#[test]
fn kubernetes_sidecar_has_a_liveness_probe_only_two_replicas_and_a_valid_config() {
    let docs = load("deploy/kubernetes/outbox-cdc.yaml");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let deployment = kind("Deployment");
    assert_eq!(
        deployment["spec"]["replicas"].as_i64(),
        Some(2),
        "standby needs two"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(0) > 30);
    let container = pod["containers"]
        .as_vec()
        .expect("containers")
        .iter()
        .find(|c| c["name"].as_str() == Some("outbox-cdc"))
        .expect("the outbox-cdc sidecar");
    assert!(
        pod["containers"].as_vec().expect("containers").len() >= 2,
        "a sidecar"
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    // A sidecar's readiness is its application's: a broker outage must not take the
    // application out of its Service.
    assert!(
        container["readinessProbe"].is_badvalue(),
        "the sidecar must not gate its pod's readiness"
    );
    assert_eq!(container["ports"][0]["containerPort"].as_i64(), Some(9187));

    // The ConfigMap's file, the container's arguments and environment, through the binary.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outbox-cdc.toml");
    let toml = kind("ConfigMap")["data"]["outbox-cdc.toml"]
        .as_str()
        .expect("config file");
    std::fs::write(&file, toml).expect("write config");
    let mut env = vec![("OUTBOX_CDC_CONFIG".to_owned(), file.display().to_string())];
    for var in container["env"].as_vec().expect("env") {
        let name = var["name"].as_str().expect("name");
        assert!(
            name == "DATABASE_URL" || name == "NATS_URL" || name.starts_with("OUTBOX_CDC_"),
            "{name}"
        );
        if name == "DATABASE_URL" {
            let url = kind("Secret")["stringData"]["database-url"]
                .as_str()
                .expect("database-url");
            env.push((name.to_owned(), url.to_owned()));
        }
    }
    let config = print_config(&strings(&container["args"]), &env);
    assert!(
        config.contains("http_addr = \"0.0.0.0:9187\"  # config file"),
        "{config}"
    );
    assert!(
        config.contains("replay_window = \"1h\"  # config file"),
        "{config}"
    );
    assert!(config.contains("stream = \"ORDERS\"  # flag"), "{config}");
    assert!(!config.contains("change-me"), "{config}");
    // `kubectl exec … outbox-cdc status` (or setup) in the container inspects the slot the
    // ConfigMap names, with the container's environment.
    for command in ["status", "setup"] {
        let config = print_config(&[command.to_owned()], &env);
        assert!(
            config.contains("slot = \"orders_outbox\"  # config file"),
            "{command}: {config}"
        );
        assert!(!config.contains("change-me"), "{config}");
    }
}

/// Every series the alert rules and the Grafana dashboard query exists in outbox-cdc's
/// `/metrics`, so a renamed metric cannot leave an alert that never fires.
#[test]
fn alert_rules_and_dashboard_query_only_metrics_outbox_cdc_exposes() {
    use outbox_cdc::stats::Stats;
    // Every labelled series is exposed from the start (at 0), as a fresh process shows it.
    let exposition = Stats::default().encode();
    let mut exposed = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                exposed.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exposed.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                exposed.insert(name.to_owned());
            }
        }
    }
    assert!(exposed.contains("outbox_cdc_slot_lag_bytes"), "{exposed:?}");
    for file in [
        "deploy/prometheus/outbox-cdc-alerts.yml",
        "deploy/grafana/outbox-cdc.json",
    ] {
        let text = std::fs::read_to_string(root().join(file)).expect("read");
        let mut queried = 0;
        for (at, _) in text.match_indices("outbox_cdc_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name == "outbox_cdc_" {
                continue; // the prefix, named in a comment
            }
            queried += 1;
            assert!(
                exposed.contains(&name),
                "{file} queries `{name}`, which outbox-cdc does not expose; it exposes {exposed:?}"
            );
        }
        assert!(queried > 5, "{file} queries outbox-cdc's metrics");
    }
    let rules = load("deploy/prometheus/outbox-cdc-alerts.yml");
    let alerts: Vec<&str> = rules[0]["groups"][0]["rules"]
        .as_vec()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for wanted in [
        "OutboxCdcSlotLagGrowing",
        "OutboxCdcNoLeader",
        "OutboxCdcNotReady",
        "OutboxCdcPoisonRowStopped",
        "OutboxCdcPoisonRowDeadLettered",
        "OutboxCdcAtomicFallback",
        "OutboxCdcReconnectStorm",
    ] {
        assert!(alerts.contains(&wanted), "{wanted} in {alerts:?}");
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/outbox-cdc.json")).expect("read"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let queries = serde_json::to_string(panels).expect("JSON");
    for family in [
        "outbox_cdc_poison_rows_total",
        "outbox_cdc_atomic_fallbacks_total",
        "outbox_cdc_publish_errors_total",
        "outbox_cdc_rows_skipped_total",
    ] {
        assert!(queries.contains(family), "the dashboard shows {family}");
    }
}

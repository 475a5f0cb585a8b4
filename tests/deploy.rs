//! The deployment files validate offline: the Kubernetes manifests against the Kubernetes
//! 1.37 schemas (PyPI kubernetes-validate, strict), the KEDA ScaledObject against KEDA's CRD
//! schema and the prometheus-adapter config against one written from its config format (both
//! vendored in deploy/schemas/), the compose file against the compose-spec schema
//! (check-jsonschema's vendored copy), the Prometheus configs and every PromQL query with
//! promtool, the recording and alerting rules with promtool's unit tests. No Docker engine or
//! cluster runs here; that is all that is checked.

mod common;

use common::root;

fn tool(name: &str) -> std::path::PathBuf {
    let p = root().join(".venv-test/bin").join(name);
    assert!(p.exists(), "{} is missing: run `make tools` (make test does)", p.display());
    p
}

fn run(cmd: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(cmd).args(args).current_dir(root()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let validate = tool("kubernetes-validate");
    let manifests: Vec<String> = ["deployment", "service", "hpa", "pdb", "backfill-job"]
        .iter()
        .map(|m| format!("deploy/k8s/{m}.yaml"))
        .collect();
    let mut args = vec!["--strict"];
    args.extend(manifests.iter().map(String::as_str));
    let (ok, report) = run(&validate, &args);
    assert!(ok && report.matches("passed").count() == 5, "{report}");

    // The validator does reject a broken manifest, so the pass above means something.
    let broken = std::env::temp_dir().join(format!("qscore-broken-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(root().join("deploy/k8s/deployment.yaml")).unwrap();
    std::fs::write(&broken, text.replace("replicas: 2", "replicas: two")).unwrap();
    let (ok, report) = run(&validate, &["--strict", broken.to_str().unwrap()]);
    assert!(!ok, "a string replica count passed: {report}");
    std::fs::remove_file(broken).unwrap();

    // ServiceMonitor is a CRD the validator has no schema for: check what ties it to the rest.
    let monitor = std::fs::read_to_string(root().join("deploy/k8s/servicemonitor.yaml")).unwrap();
    let service = std::fs::read_to_string(root().join("deploy/k8s/service.yaml")).unwrap();
    assert!(monitor.contains("apiVersion: monitoring.coreos.com/v1") && monitor.contains("kind: ServiceMonitor"));
    assert!(monitor.contains("{port: http, path: /metrics") && service.contains("{name: http, port: 80"));

    // Probes, drain and resources, as the serving issue asks.
    for want in [
        "path: /health/ready",
        "path: /health/live",
        "preStop",
        "terminationGracePeriodSeconds: 45",
        "requests:",
        "limits:",
    ] {
        assert!(text.contains(want), "deployment.yaml lacks {want}");
    }
    assert!(text.contains("QSCORE_SHUTDOWN_GRACE_S, value: \"30\""), "grace 45 s must cover preStop 10 s + drain 30 s");
}

/// The backfill Job's shard count is written three times (completions, --shard, the file name):
/// they must agree, or some shards are never scored or two pods write one file.
#[test]
fn the_backfill_job_runs_one_shard_per_index() {
    let job = std::fs::read_to_string(root().join("deploy/k8s/backfill-job.yaml")).unwrap();
    let completions: u32 = job
        .lines()
        .find_map(|l| l.trim().strip_prefix("completions: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("completions: N");
    for want in [
        "completionMode: Indexed".to_owned(),
        "restartPolicy: Never".to_owned(),
        "backoffLimitPerIndex:".to_owned(),
        format!("--shard=$(JOB_COMPLETION_INDEX)/{completions}"),
        format!("shard-$(JOB_COMPLETION_INDEX)-of-{completions}.parquet"),
        "persistentVolumeClaim:".to_owned(),
        "requests:".to_owned(),
        "limits:".to_owned(),
    ] {
        assert!(job.contains(&want), "backfill-job.yaml lacks {want}");
    }
}

#[test]
fn compose_dashboard_and_prometheus_configs_validate() {
    let (ok, report) =
        run(&tool("check-jsonschema"), &["--builtin-schema", "vendor.compose-spec", "deploy/compose.yaml"]);
    assert!(ok, "{report}");
    for config in ["deploy/prometheus/compose.yml", "deploy/prometheus/prometheus.yml"] {
        let out = std::process::Command::new("promtool")
            .args(["check", "config", config])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(out.status.success(), "{config}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The dashboard against the schema of what provisioning loads and the panels use.
    let (ok, report) = run(
        &tool("check-jsonschema"),
        &["--schemafile", "deploy/grafana/dashboard.schema.json", "deploy/grafana/qscore.json"],
    );
    assert!(ok, "{report}");
    let compose = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    for mounted in
        ["./prometheus/compose.yml", "./prometheus/alerts.yml", "./grafana/provisioning", "./grafana/qscore.json"]
    {
        assert!(root().join("deploy").join(mounted).exists(), "compose mounts {mounted}, which is missing");
        assert!(compose.contains(mounted));
    }
}

/// Checks `queries` (name, PromQL) parse, as promtool reads them in a rules file.
fn promql_parses(queries: &[(String, String)]) {
    let mut rules = String::from("groups:\n  - name: parse\n    rules:\n");
    for (i, (_, q)) in queries.iter().enumerate() {
        rules += &format!("      - record: parse:check_{i}\n        expr: {}\n", serde_json::to_string(q).unwrap());
    }
    let file = std::env::temp_dir().join(format!("qscore-queries-{}-{}.yml", std::process::id(), queries.len()));
    std::fs::write(&file, &rules).unwrap();
    let out = std::process::Command::new("promtool").args(["check", "rules"]).arg(&file).output().unwrap();
    std::fs::remove_file(&file).unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{queries:#?}\n{report}");
    assert!(report.contains(&format!("SUCCESS: {} rules found", queries.len())), "{report}");
}

/// The values of `key: '...'` lines (single-quoted, as the autoscaling files write queries).
fn quoted_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix(&format!("{key}: ")))
        .map(|v| v.trim().trim_matches('\'').replace("''", "'"))
        .collect()
}

/// Autoscaling on queue depth and queue wait: KEDA's ScaledObject against the CRD schema of
/// KEDA v2.20.2 (a broken one fails), the HPA on Pods metrics against Kubernetes' schema, the
/// prometheus-adapter config against its schema, and every query parses in promtool, the
/// adapter's with its template placeholders filled in as the adapter fills them.
#[test]
fn autoscaling_on_queue_depth_validates() {
    let check = tool("check-jsonschema");
    let keda_schema = "deploy/schemas/keda-scaledobject-v2.20.2.json";
    let (ok, report) = run(&check, &["--schemafile", keda_schema, "deploy/k8s/keda-scaledobject.yaml"]);
    assert!(ok, "{report}");
    let keda = std::fs::read_to_string(root().join("deploy/k8s/keda-scaledobject.yaml")).unwrap();
    for (what, from, to) in [
        ("a number where KEDA wants a string", "threshold: \"16\"", "threshold: 16"),
        ("a misspelt field", "maxReplicaCount:", "maxReplicas:"),
        ("no scale target", "scaleTargetRef:", "scaleTarget:"),
    ] {
        assert!(keda.contains(from), "{from}");
        let broken = std::env::temp_dir().join(format!("qscore-broken-keda-{}.yaml", std::process::id()));
        std::fs::write(&broken, keda.replacen(from, to, 1)).unwrap();
        let (ok, report) = run(&check, &["--schemafile", keda_schema, broken.to_str().unwrap()]);
        std::fs::remove_file(&broken).unwrap();
        assert!(!ok, "a ScaledObject with {what} passed: {report}");
    }
    // Scale on the queue, not on CPU.
    let hpa = std::fs::read_to_string(root().join("deploy/k8s/hpa.yaml")).unwrap();
    assert!(!hpa.contains("cpu") && hpa.contains("type: Pods"), "{hpa}");
    for metric in ["qscore_queue_depth", "qscore_queue_wait_seconds"] {
        assert!(keda.contains(metric) && hpa.contains(metric), "{metric}");
    }

    let adapter_schema = "deploy/schemas/prometheus-adapter-config.json";
    let (ok, report) = run(&check, &["--schemafile", adapter_schema, "deploy/k8s/prometheus-adapter-rules.yaml"]);
    assert!(ok, "{report}");
    let adapter = std::fs::read_to_string(root().join("deploy/k8s/prometheus-adapter-rules.yaml")).unwrap();
    let broken = std::env::temp_dir().join(format!("qscore-broken-adapter-{}.yaml", std::process::id()));
    std::fs::write(&broken, adapter.replacen("metricsQuery:", "metricQuery:", 1)).unwrap();
    let (ok, report) = run(&check, &["--schemafile", adapter_schema, broken.to_str().unwrap()]);
    std::fs::remove_file(&broken).unwrap();
    assert!(!ok, "an adapter rule with a misspelt metricsQuery passed: {report}");
    // Every HPA metric is one the adapter exposes.
    for name in hpa.lines().filter_map(|l| l.trim().strip_prefix("metric: {name: ")) {
        let name = name.trim_end_matches('}');
        assert!(adapter.contains(&format!("as: \"{name}\"")), "the adapter does not expose {name}");
    }

    let mut queries: Vec<(String, String)> =
        quoted_values(&keda, "query").into_iter().map(|q| ("keda".to_owned(), q)).collect();
    assert_eq!(queries.len(), 2, "{keda}");
    let series = quoted_values(&adapter, "seriesQuery");
    let metrics_queries = quoted_values(&adapter, "metricsQuery");
    assert_eq!((series.len(), metrics_queries.len()), (2, 2), "{adapter}");
    for (s, q) in series.iter().zip(&metrics_queries) {
        let name = &s[..s.find('{').unwrap()];
        let filled = q
            .replace("<<.Series>>", name)
            .replace("<<.LabelMatchers>>", r#"namespace="default",pod=~"qscore-7d9f-.*""#)
            .replace("<<.GroupBy>>", "pod");
        assert!(!filled.contains("<<"), "an unknown placeholder: {q}");
        queries.push(("adapter series".to_owned(), s.clone()));
        queries.push(("adapter metrics".to_owned(), filled));
    }
    promql_parses(&queries);
    // And the check catches a broken query.
    let result = std::panic::catch_unwind(|| promql_parses(&[("broken".into(), "sum(qscore_queue_depth".into())]));
    assert!(result.is_err(), "promtool accepted an unbalanced parenthesis");
}

/// The recording rules and alerts under promtool's unit tests: two replicas' window counts with
/// hand-computed fleet PSI, binned KS, flagged share and mean p_misclassified
/// (tests/drift_rules.test.yml).
#[test]
fn fleet_drift_rules_pass_their_unit_tests() {
    let out = std::process::Command::new("promtool")
        .args(["test", "rules", "tests/drift_rules.test.yml"])
        .current_dir(root())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && report.contains("SUCCESS"), "{report}");
    // The unit tests can fail: a wrong expected PSI does.
    let test = std::fs::read_to_string(root().join("tests/drift_rules.test.yml")).unwrap();
    let broken = root().join(format!("tests/drift_rules.broken-{}.test.yml", std::process::id()));
    std::fs::write(&broken, test.replacen("value: 0.4158883083359672", "value: 0.42", 1)).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&broken)
        .current_dir(root())
        .output()
        .unwrap();
    std::fs::remove_file(&broken).unwrap();
    assert!(!out.status.success(), "promtool passed a wrong PSI");
}

//! The deployment files validate offline: the Kubernetes manifests against the Kubernetes
//! 1.37 schemas (PyPI kubernetes-validate, strict), the compose file against the compose-spec
//! schema (check-jsonschema's vendored copy), the Prometheus configs with promtool. No Docker
//! engine or cluster runs here; that is all that is checked.

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

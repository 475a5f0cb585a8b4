//! The Python client (clients/python) against the real server: its pytest suite
//! (clients/python/tests) runs in .venv-test with this server's address in the environment, and
//! the test fails when pytest fails or skips anything.
//!
//! The server runs with an API key (the suite checks it is required and accepted), a batch limit
//! of 16 (so batches are split) and a 16 MiB memory budget (so a few stalled uploads fill the held
//! share and the suite gets a real 429 with Retry-After). The suite also starts a local Ray
//! (two CPUs, no dashboard) and scores the Fashion-MNIST fixtures through `map_batches`.
//!
//! The suite imports the client from this checkout's clients/python/src, not from whatever copy
//! the shared .venv-test holds; `make tools` still installs the package to prove it installs.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Server, root};

const API_KEY: &str = "python-client-test-key";
const MAX_BATCH_IMAGES: &str = "16";
const MEMORY_BUDGET_BYTES: &str = "16777216";
/// Ray's start-up and three small datasets stay far below this on two cores.
const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn python_client_suite() {
    let python = root().join(".venv-test/bin/python");
    assert!(python.exists(), "{} is missing: run `make tools` (make test does)", python.display());
    let scratch = std::env::temp_dir().join(format!("qscore-python-client-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let keys = scratch.join("keys");
    std::fs::write(&keys, format!("{API_KEY}\n")).unwrap();
    let s = Server::start(&[
        "--model",
        "fmnist-simclr",
        "--api-keys-file",
        keys.to_str().unwrap(),
        "--max-batch-images",
        MAX_BATCH_IMAGES,
        "--memory-budget-bytes",
        MEMORY_BUDGET_BYTES,
    ]);

    let log = scratch.join("pytest.log");
    let out = std::fs::File::create(&log).unwrap();
    // Output goes to a file: a pipe nobody reads while we wait would fill and stall pytest.
    let mut child = Command::new(&python)
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "clients/python/tests"])
        .current_dir(root())
        .env("PYTHONPATH", root().join("clients/python/src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .env("QSCORE_URL", &s.url)
        .env("QSCORE_API_KEY", API_KEY)
        .env("QSCORE_MAX_BATCH_IMAGES", MAX_BATCH_IMAGES)
        .env("QSCORE_MEMORY_BUDGET_BYTES", MEMORY_BUDGET_BYTES)
        .env("QSCORE_FIXTURES", root().join("tests/fixtures"))
        .env("QSCORE_TEST_MODEL", "fmnist-simclr")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("{} cannot run ({e}): run `make tools`", python.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&scratch);
    let status = status.unwrap_or_else(|| panic!("the Python client suite ran past {LIMIT:?}:\n{output}"));
    assert!(
        status.success(),
        "the Python client suite failed ({status}); missing packages come from `make tools`:\n{output}\nserver log:\n{}",
        s.log()
    );
    assert!(!output.contains("skipped"), "the Python client suite skipped tests; run `make tools`:\n{output}");
    eprintln!("python client suite: {:.1} s\n{output}", start.elapsed().as_secs_f64());
}

//! Backfills with the real binary, the real calibrated Fashion-MNIST encoder and real files:
//! `qscore score --manifest` in shards written as Parquet, resumed, fed from a local HTTP server,
//! and `qscore drift` over the shards against a live server's `/v1/drift` on the same images.
//! The Parquet files are read back with the parquet crate's own reader, not with qscore's.

mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Output,
};

use common::{Server, fixture, fmnist_fixtures, root};
use parquet::{
    file::reader::{FileReader, SerializedFileReader},
    record::Field,
};
use serde_json::Value;

const MODEL: &str = "fmnist-simclr";

/// A scratch folder, emptied first.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qscore-backfill-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A models folder holding only the calibrated SimCLR encoder (links to the bundled files), so
/// each run loads one small model.
fn models(dir: &Path) -> PathBuf {
    let to = dir.join("models").join(MODEL);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["model.onnx", "model.toml", "calibration.json"] {
        std::os::unix::fs::symlink(root().join("models").join(MODEL).join(f), to.join(f)).unwrap();
    }
    dir.join("models")
}

fn qscore(args: &[&str]) -> Output {
    common::qscore_bin().env_remove("QSCORE_MODEL").args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One row as the parquet crate reads it: column name to value.
type Row = BTreeMap<String, Field>;

fn read_parquet(path: &Path) -> (Vec<Row>, BTreeMap<String, String>) {
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not readable Parquet: {e}", path.display()));
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().map(|k| (k.key.clone(), k.value.clone().unwrap_or_default())).collect())
        .unwrap_or_default();
    let rows = reader
        .get_row_iter(None)
        .unwrap()
        .map(|r| r.unwrap().get_column_iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .collect();
    (rows, kv)
}

fn text(row: &Row, col: &str) -> Option<String> {
    match &row[col] {
        Field::Str(s) => Some(s.clone()),
        Field::Null => None,
        other => panic!("{col} is {other:?}"),
    }
}

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

/// 60 fixture images (6 per class, half as paths relative to the manifest's folder), three bad
/// lines, and what a hand-written manifest has: a BOM, CRLF, a comment, a blank line. Answers
/// the manifest and (line, entry) of every entry.
fn write_manifest(dir: &Path) -> (PathBuf, Vec<(i64, String)>) {
    std::os::unix::fs::symlink(fixture("fmnist"), dir.join("img")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not an image\n").unwrap();
    let mut entries = Vec::new();
    for (i, f) in fmnist_fixtures(6).iter().enumerate() {
        entries.push(if i % 2 == 0 {
            f.display().to_string()
        } else {
            let rel = f.strip_prefix(fixture("fmnist")).unwrap();
            format!("img/{}", rel.display())
        });
    }
    entries.insert(7, "missing/nope.png".into());
    entries.insert(31, "notes.txt".into());
    entries.insert(50, "http://images.invalid:8080/a.png".into());
    let mut text = String::from("\u{feff}# a Fashion-MNIST backfill\r\n\r\n");
    let mut numbered = Vec::new();
    for (k, e) in entries.iter().enumerate() {
        numbered.push((k as i64 + 3, e.clone()));
        text.push_str(&format!("{e}\r\n"));
    }
    let path = dir.join("manifest.txt");
    std::fs::write(&path, text).unwrap();
    (path, numbered)
}

fn score_shard(models: &Path, manifest: &Path, shard: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["score", "--models-dir", models.to_str().unwrap(), "--model", MODEL];
    args.extend(["--manifest", manifest.to_str().unwrap(), "--shard", shard, "--format", "parquet"]);
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    qscore(&args)
}

#[test]
fn shards_cover_the_manifest_once_resume_and_never_take_a_partial_file_for_done() {
    let dir = scratch("shards");
    let models = models(&dir);
    let (manifest, entries) = write_manifest(&dir);
    let out = |i: usize| dir.join(format!("shard-{i}.parquet"));

    let started = std::time::Instant::now();
    for i in 0..3 {
        let run = score_shard(&models, &manifest, &format!("{i}/3"), &out(i), &[]);
        // Shard 1 holds a missing file and shard 2 a refused URL: a rerun may change those, so
        // the shard is not done (exit 1, for the Job to retry); shard 0 has no failure.
        assert_eq!(run.status.code(), Some(if i == 0 { 0 } else { 1 }), "shard {i}: {}", stderr(&run));
        assert!(stderr(&run).contains(&format!("wrote shard {i}/3")), "{}", stderr(&run));
    }
    let (_, kv) = read_parquet(&out(1));
    assert_eq!(kv["qscore.retryable_failures"], "1", "missing/nope.png; notes.txt is the image's own fault");
    println!("3 shards of {} entries scored and written in {:.2?}", entries.len(), started.elapsed());

    let calibration = sha256_of(&root().join("models").join(MODEL).join("calibration.json"));
    let manifest_sha = sha256_of(&manifest);
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut errors = BTreeMap::new();
    for i in 0..3 {
        let (rows, kv) = read_parquet(&out(i));
        assert_eq!(kv["qscore.shard"], format!("{i}/3"));
        assert_eq!(kv["qscore.manifest_sha256"], manifest_sha);
        assert_eq!(kv["qscore.model"], MODEL);
        assert_eq!(kv["qscore.calibration_sha256"], calibration);
        assert_eq!(kv["qscore.rows"], rows.len().to_string());
        for row in &rows {
            let Field::Long(line) = row["line"] else { panic!("line is {:?}", row["line"]) };
            let input = text(row, "input").unwrap();
            assert_eq!(text(row, "model").as_deref(), Some(MODEL));
            assert_eq!(text(row, "calibration_sha256"), Some(calibration.clone()));
            assert!(!text(row, "model_version").unwrap().is_empty());
            match text(row, "error_code") {
                Some(code) => {
                    assert!(matches!(row["q_score"], Field::Null), "{input}: a failed row has no score");
                    assert!(text(row, "error_message").is_some_and(|m| !m.is_empty()));
                    errors.insert(input.clone(), code);
                }
                None => {
                    assert!(matches!(row["q_score"], Field::Float(q) if q >= 0.0), "{input}: {:?}", row["q_score"]);
                    assert!(matches!(row["p_misclassified"], Field::Float(p) if (0.0..=1.0).contains(&p)));
                    assert!(matches!(row["likely_misclassified"], Field::Bool(_)));
                    assert!(text(row, "predicted_class").is_some());
                    let features: Value = serde_json::from_str(&text(row, "discriminative_features").unwrap()).unwrap();
                    let Field::Int(active) = row["active_discriminative"] else { panic!() };
                    assert_eq!(features.as_array().unwrap().len(), active as usize, "{input}");
                }
            }
            seen.push((line, input));
        }
    }
    seen.sort();
    assert_eq!(seen, entries, "the shards' union is the manifest, each entry once");
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert_eq!(errors["missing/nope.png"], "unreadable_file");
    assert_eq!(errors["notes.txt"], "unsupported_image_format");
    assert_eq!(errors["http://images.invalid:8080/a.png"], "url_refused");

    // A rerun skips a finished shard and leaves the file alone.
    let before = (std::fs::read(out(0)).unwrap(), std::fs::metadata(out(0)).unwrap().modified().unwrap());
    let rerun = score_shard(&models, &manifest, "0/3", &out(0), &[]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert!(stderr(&rerun).contains("skipped shard 0/3"), "{}", stderr(&rerun));
    assert_eq!((std::fs::read(out(0)).unwrap(), std::fs::metadata(out(0)).unwrap().modified().unwrap()), before);

    // A shard whose data pages were overwritten is read back before it is trusted: not skipped.
    let mut damaged = before.0.clone();
    damaged[100..108].copy_from_slice(&[0x7f; 8]);
    std::fs::write(out(0), &damaged).unwrap();
    let checked = score_shard(&models, &manifest, "0/3", &out(0), &[]);
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert!(!stderr(&checked).contains("skipped"), "{}", stderr(&checked));
    let lines: Vec<i64> =
        read_parquet(&out(0)).0.iter().map(|r| if let Field::Long(l) = r["line"] { l } else { panic!() }).collect();
    let want: Vec<i64> = entries.iter().step_by(3).map(|(l, _)| *l).collect();
    assert_eq!(lines, want);
    let before = (std::fs::read(out(0)).unwrap(), std::fs::metadata(out(0)).unwrap().modified().unwrap());

    // The same --out for another shard is refused, saying what to do; nothing is written.
    let other = score_shard(&models, &manifest, "0/2", &out(0), &[]);
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("shard 0/3 (wanted 0/2)") && stderr(&other).contains("--force"),
        "{}",
        stderr(&other)
    );
    assert_eq!(std::fs::read(out(0)).unwrap(), before.0);

    // A truncated file is not finished: the shard is scored again and the file whole again.
    let whole = std::fs::read(out(1)).unwrap();
    std::fs::write(out(1), &whole[..whole.len() / 2]).unwrap();
    let again = score_shard(&models, &manifest, "1/3", &out(1), &[]);
    assert!(stderr(&again).contains("not a finished shard"), "{}", stderr(&again));
    assert_eq!(read_parquet(&out(1)).0.len(), 21, "63 entries in 3 shards");

    // A temporary file left by a killed run (even a complete one) is not the shard.
    let tmp = dir.join(".shard-2.parquet.4242.tmp");
    std::fs::rename(out(2), &tmp).unwrap();
    let after_kill = score_shard(&models, &manifest, "2/3", &out(2), &[]);
    assert!(stderr(&after_kill).contains("wrote shard 2/3"), "{}", stderr(&after_kill));
    assert_eq!(read_parquet(&out(2)).0.len(), read_parquet(&tmp).0.len());

    // --force replaces another backfill's file.
    let forced = score_shard(&models, &manifest, "0/2", &out(0), &["--force"]);
    assert!(stderr(&forced).contains("wrote shard 0/2"), "{}", stderr(&forced));
    assert_eq!(read_parquet(&out(0)).1["qscore.shard"], "0/2");

    // drift takes distinct shards of one backfill only.
    let drift = |files: &[&Path]| {
        let mut args = vec!["drift", "--models-dir", models.to_str().unwrap(), "--reference", MODEL, "--scores"];
        args.extend(files.iter().map(|f| f.to_str().unwrap()));
        qscore(&args)
    };
    let twice = drift(&[&out(1), &out(1)]);
    assert!(!twice.status.success() && stderr(&twice).contains("are the same file"), "{}", stderr(&twice));
    let copy = dir.join("copy-of-1.parquet");
    std::fs::copy(out(1), &copy).unwrap();
    let same_shard = drift(&[&out(1), &copy]);
    assert!(stderr(&same_shard).contains("both hold shard 1/3"), "{}", stderr(&same_shard));
    let mixed = drift(&[&out(0), &out(1)]);
    assert!(stderr(&mixed).contains("different backfills"), "{}", stderr(&mixed));

    // The same manifest as JSON lines: one line per entry of the shard, failures included.
    let jsonl = qscore(&[
        "score",
        "--models-dir",
        models.to_str().unwrap(),
        "--model",
        MODEL,
        "--manifest",
        manifest.to_str().unwrap(),
        "--shard",
        "1/3",
    ]);
    assert!(!jsonl.status.success(), "an entry failed, so the exit status says so");
    let lines: Vec<Value> =
        String::from_utf8(jsonl.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 21);
    assert!(lines.iter().any(|l| l["file"] == "notes.txt" && l["error"]["code"] == "unsupported_image_format"));

    // Shards are checked when the command line is parsed.
    for (bad, says) in [("3/3", "INDEX must be below COUNT"), ("0/0", "COUNT must be at least 1"), ("x", "INDEX/COUNT")]
    {
        let refused = score_shard(&models, &manifest, bad, &out(9), &[]);
        assert_eq!(refused.status.code(), Some(2), "{bad}");
        assert!(stderr(&refused).contains(says), "{bad}: {}", stderr(&refused));
    }
    // clap lets `requires` pass when the required flag conflicts with a present one: a shard
    // of plain files must still be refused.
    let files_shard = qscore(&["score", "--shard", "1/2", manifest.to_str().unwrap()]);
    assert_eq!(files_shard.status.code(), Some(2), "{}", stderr(&files_shard));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny HTTP/1.1 server on 127.0.0.1: `/img/NAME` answers the fixture image, `/big` declares
/// more bytes than the limit, `/stream` sends them without a length, `/hop` redirects to a port
/// nobody allowed, anything else is 404.
fn serve_images(files: Vec<PathBuf>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let found = path.strip_prefix("/img/").and_then(|n| files.iter().find(|f| f.file_name().unwrap() == n));
            let reply = |status: &str, headers: &str, body: &[u8]| -> Vec<u8> {
                let mut r = format!("HTTP/1.1 {status}\r\nconnection: close\r\n{headers}\r\n").into_bytes();
                r.extend_from_slice(body);
                r
            };
            let response = match (path.as_str(), found) {
                (_, Some(f)) => {
                    let body = std::fs::read(f).unwrap();
                    reply("200 OK", &format!("content-type: image/png\r\ncontent-length: {}\r\n", body.len()), &body)
                }
                ("/big", _) => reply("200 OK", "content-length: 50000\r\n", &[0u8; 50000]),
                ("/stream", _) => reply("200 OK", "", &[0u8; 50000]),
                ("/hop", _) => reply("302 Found", "location: http://127.0.0.1:9/a.png\r\ncontent-length: 0\r\n", b""),
                _ => reply("404 Not Found", "content-length: 9\r\n", b"not found"),
            };
            let _ = conn.write_all(&response);
        }
    });
    port
}

#[test]
fn urls_are_fetched_from_allowed_hosts_only_and_every_failure_is_a_row() {
    let dir = scratch("urls");
    let models = models(&dir);
    let files = fmnist_fixtures(1);
    let port = serve_images(files.clone());
    let base = format!("http://127.0.0.1:{port}");
    let mut lines: Vec<String> =
        files.iter().map(|f| format!("{base}/img/{}", f.file_name().unwrap().to_string_lossy())).collect();
    for bad in ["/nothing.png", "/big", "/stream", "/hop"] {
        lines.push(format!("{base}{bad}"));
    }
    let manifest = dir.join("urls.txt");
    std::fs::write(&manifest, lines.join("\n")).unwrap();
    let out = dir.join("urls.parquet");
    let allow = format!("127.0.0.1:{port}");
    let run = score_shard(&models, &manifest, "0/1", &out, &["--allow-host", &allow, "--max-image-bytes", "20000"]);
    assert_eq!(run.status.code(), Some(1), "the 404 may be fixed by a rerun: {}", stderr(&run));
    assert!(stderr(&run).contains("fetch_failed: 1"), "{}", stderr(&run));
    let (rows, _) = read_parquet(&out);
    assert_eq!(rows.len(), lines.len());
    let by_input: BTreeMap<String, Option<String>> =
        rows.iter().map(|r| (text(r, "input").unwrap(), text(r, "error_code"))).collect();
    for line in &lines[..files.len()] {
        assert_eq!(by_input[line], None, "{line} was fetched and scored");
    }
    assert_eq!(by_input[&format!("{base}/nothing.png")].as_deref(), Some("fetch_failed"), "404");
    assert_eq!(by_input[&format!("{base}/big")].as_deref(), Some("image_too_large"), "declared over the limit");
    assert_eq!(by_input[&format!("{base}/stream")].as_deref(), Some("image_too_large"), "streamed over the limit");
    assert_eq!(by_input[&format!("{base}/hop")].as_deref(), Some("url_refused"), "a redirect to a host not allowed");
    let messages: Vec<String> = rows.iter().filter_map(|r| text(r, "error_message")).collect();
    assert!(messages.iter().any(|m| m.contains("404")), "{messages:?}");
    assert!(
        messages.iter().any(|m| m.contains("over the limit of 20000 bytes") && m.contains("reading stopped at")),
        "a body of unknown length has no size to report: {messages:?}"
    );

    // Without --allow-host every URL is a row saying which flag fetches it; the port matters.
    for extra in [vec![], vec!["--allow-host", "127.0.0.1:1"]] {
        let mut args = vec!["score", "--models-dir", models.to_str().unwrap(), "--model", MODEL];
        args.extend(["--manifest", manifest.to_str().unwrap()]);
        args.extend(extra.iter().copied());
        let refused = qscore(&args);
        let answers: Vec<Value> =
            String::from_utf8(refused.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(answers.len(), lines.len());
        for a in &answers {
            assert_eq!(a["error"]["code"], "url_refused", "{a}");
            assert!(a["error"]["message"].as_str().unwrap().contains(&format!("--allow-host {allow}")), "{a}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn drift_over_the_shards_is_the_live_windows_drift_on_the_same_images() {
    let dir = scratch("drift");
    let models = models(&dir);
    let (manifest, _) = write_manifest(&dir);
    let shards: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("part-{i}.parquet"))).collect();
    for (i, out) in shards.iter().enumerate() {
        let run = score_shard(&models, &manifest, &format!("{i}/2"), out, &[]);
        assert!(stderr(&run).contains("wrote shard"), "{}", stderr(&run));
    }
    let mut args = vec!["drift", "--models-dir", models.to_str().unwrap(), "--reference", MODEL, "--scores"];
    args.extend(shards.iter().map(|s| s.to_str().unwrap()));
    let drift = qscore(&args);
    assert!(drift.status.success(), "{}", stderr(&drift));
    let offline: Value = serde_json::from_slice(&drift.stdout).unwrap();
    assert_eq!(offline["backfill"]["rows"], 63);
    assert_eq!(offline["backfill"]["failed"], 3, "failed rows are counted, not used");
    let offline = &offline["models"][0];

    let server = Server::start_with_models(&models, &["--model", MODEL]);
    for f in fmnist_fixtures(6) {
        let r = server.post_raw(&format!("/v1/score?model={MODEL}"), "image/png", std::fs::read(f).unwrap());
        assert_eq!(r.status(), 200);
    }
    let live: Value = server.get(&format!("/v1/drift?model={MODEL}")).json().unwrap();
    let live = &live["models"][0];
    // 60 images: compared, and said to be too few for the shipped thresholds.
    assert_eq!(live["status"], "too_few_images");
    assert_eq!(offline["status"], "too_few_images");
    assert_eq!(offline["window_images"], 60);
    assert_eq!(offline["window_images"], live["window_images"]);
    for key in [
        "ks",
        "psi",
        "flagged_ratio",
        "expected_flagged_ratio",
        "mean_p_misclassified",
        "reference_mean_p_misclassified",
        "mean_q_score",
        "reference_median_q_score",
        "reference_images",
    ] {
        let (a, b) = (offline[key].as_f64().unwrap(), live[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{key}: backfill {a}, live {b}");
    }
    assert!(offline["ks"].as_f64().unwrap() > 0.0, "the statistics were computed, not defaulted");
    let features = |r: &Value| -> Vec<(u64, f64)> {
        r["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["index"].as_u64().unwrap(), f["window_frequency"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(features(offline), features(live));
    assert!(!features(offline).is_empty());
    assert_eq!(offline["embedding"]["status"], "not_stored");

    // Rows from another calibration, or another model, are an error naming the file.
    let other = dir.join("other");
    let to = other.join(MODEL);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["model.onnx", "model.toml"] {
        std::os::unix::fs::symlink(root().join("models").join(MODEL).join(f), to.join(f)).unwrap();
    }
    let cal = std::fs::read_to_string(root().join("models").join(MODEL).join("calibration.json")).unwrap();
    std::fs::write(to.join("calibration.json"), format!("{cal}\n")).unwrap();
    let mut args = vec!["drift", "--models-dir", other.to_str().unwrap(), "--reference", MODEL, "--scores"];
    args.push(shards[1].to_str().unwrap());
    let refused = qscore(&args);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("part-1.parquet") && stderr(&refused).contains("calibration sha256"),
        "{}",
        stderr(&refused)
    );
    let byol = "fmnist-byol";
    let to = other.join(byol);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["model.onnx", "model.toml", "calibration.json"] {
        std::os::unix::fs::symlink(root().join("models").join(byol).join(f), to.join(f)).unwrap();
    }
    let mut args = vec!["drift", "--models-dir", other.to_str().unwrap(), "--reference", byol, "--scores"];
    args.push(shards[0].to_str().unwrap());
    let refused = qscore(&args);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("part-0.parquet") && stderr(&refused).contains("not the reference"),
        "{}",
        stderr(&refused)
    );

    // Rewritten by another tool (pyarrow): q_score cast to float64, or rows cut while the footer
    // still promises them. An error naming the file, never scored rows quietly left out.
    let python = root().join(".venv-test/bin/python");
    let q = "t.set_column(t.schema.get_field_index('q_score'), 'q_score', t['q_score'].cast('float64'))";
    for (name, rewrite) in [("float64", q), ("cut", "t.slice(0, 10)")] {
        let out = dir.join(format!("{name}.parquet"));
        let code = format!(
            "import pyarrow.parquet as pq, sys\nt = pq.read_table(sys.argv[1])\npq.write_table({rewrite}, sys.argv[2])\n"
        );
        let done = std::process::Command::new(&python)
            .args(["-c", &code, shards[0].to_str().unwrap(), out.to_str().unwrap()])
            .status()
            .unwrap_or_else(|e| panic!("{} ({e}): run `make tools`", python.display()));
        assert!(done.success());
        let args = ["drift", "--models-dir", models.to_str().unwrap(), "--reference", MODEL, "--scores"];
        let mut args = args.to_vec();
        args.extend([out.to_str().unwrap(), shards[1].to_str().unwrap()]);
        let refused = qscore(&args);
        assert!(
            !refused.status.success() && stderr(&refused).contains(&format!("{name}.parquet")),
            "{name}: {}",
            stderr(&refused)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs qscore, killing it after `secs`: a run that would block forever fails the test.
fn qscore_within(secs: u64, dir: &Path, args: &[&str]) -> Output {
    let mut child = common::qscore_bin()
        .env_remove("QSCORE_MODEL")
        // Run from `dir` (relative paths are the point), so the runtime's relative default is not found.
        .env("QSCORE_ORT_LIB", root().join(".ort").join("libonnxruntime.so"))
        .current_dir(dir)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("qscore {args:?} was still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn retryable_failures_are_scored_again_and_files_that_are_not_shards_are_kept() {
    let dir = scratch("retry");
    let models = models(&dir);
    let models_arg = models.to_str().unwrap();
    let files = fmnist_fixtures(1);
    let port = serve_images(files.clone());
    let urls: Vec<String> = files[..2]
        .iter()
        .map(|f| format!("http://localhost:{port}/img/{}", f.file_name().unwrap().to_string_lossy()))
        .collect();
    let manifest = dir.join("u2.txt");
    std::fs::write(&manifest, urls.join("\n")).unwrap();
    let out = dir.join("u2.parquet");

    // Forgot --allow-host: two refused rows, which a rerun may change: exit 1, not done.
    let forgot = score_shard(&models, &manifest, "0/1", &out, &[]);
    assert_eq!(forgot.status.code(), Some(1), "{}", stderr(&forgot));
    assert!(stderr(&forgot).contains("url_refused: 2"), "{}", stderr(&forgot));
    assert_eq!(read_parquet(&out).1["qscore.retryable_failures"], "2");
    let allowed = score_shard(&models, &manifest, "0/1", &out, &["--allow-host", "localhost"]);
    assert_eq!(allowed.status.code(), Some(0), "{}", stderr(&allowed));
    assert!(
        stderr(&allowed)
            .contains("2 rows failed for reasons a rerun may change (url_refused: 2); scoring shard 0/1 again"),
        "{}",
        stderr(&allowed)
    );
    assert!(read_parquet(&out).0.iter().all(|r| text(r, "error_code").is_none()));
    let done = score_shard(&models, &manifest, "0/1", &out, &["--allow-host", "localhost"]);
    assert!(done.status.success() && stderr(&done).contains("skipped shard 0/1"), "{}", stderr(&done));

    // Permanent failures only (the image itself is bad) are data: exit 0, and a rerun skips.
    let bad = dir.join("bad.txt");
    std::fs::write(dir.join("notes.txt"), "not an image\n").unwrap();
    std::fs::write(&bad, "notes.txt\n").unwrap();
    let bad_out = dir.join("bad.parquet");
    let first = score_shard(&models, &bad, "0/1", &bad_out, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let rerun = score_shard(&models, &bad, "0/1", &bad_out, &[]);
    assert!(rerun.status.success() && stderr(&rerun).contains("skipped shard 0/1"), "{}", stderr(&rerun));

    // --out that is someone's file is kept unless --force; the manifest itself always is.
    let text_out = dir.join("text.parquet");
    std::fs::write(&text_out, "hi\n").unwrap();
    let refused = score_shard(&models, &bad, "0/1", &text_out, &[]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not a Parquet file") && stderr(&refused).contains("--force"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(std::fs::read_to_string(&text_out).unwrap(), "hi\n");
    let forced = score_shard(&models, &bad, "0/1", &text_out, &["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    let before = std::fs::read(&bad).unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let onto = score_shard(&models, &bad, "0/1", &bad, extra);
        assert!(!onto.status.success() && stderr(&onto).contains("is the manifest itself"), "{}", stderr(&onto));
        assert_eq!(std::fs::read(&bad).unwrap(), before);
    }
    // Our unfinished file (Parquet's magic, no footer) is scored again without --force.
    let cut = dir.join("cut.parquet");
    std::fs::write(&cut, b"PAR1\x15\x00").unwrap();
    let resumed = score_shard(&models, &bad, "0/1", &cut, &[]);
    assert!(resumed.status.success() && stderr(&resumed).contains("not a finished shard"), "{}", stderr(&resumed));

    // A FIFO never blocks: in a manifest it is the entry's error; as the manifest, or as a
    // --scores file, the command's.
    assert!(std::process::Command::new("mkfifo").arg(dir.join("fifo")).status().unwrap().success());
    std::fs::write(dir.join("fifo.txt"), format!("{}\nfifo\nmissing.png\n", files[0].display())).unwrap();
    let run =
        qscore_within(60, &dir, &["score", "--models-dir", models_arg, "--model", MODEL, "--manifest", "fifo.txt"]);
    let lines: Vec<Value> =
        String::from_utf8(run.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{}", stderr(&run));
    assert!(lines[0]["error"].is_null(), "{}", lines[0]);
    assert_eq!(lines[1]["error"]["code"], "unreadable_file");
    assert!(lines[1]["error"]["message"].as_str().unwrap().contains("FIFO"), "{}", lines[1]);
    // A relative manifest's folder is named, not left blank.
    let folder = format!("manifest's folder, {}:", dir.display());
    assert!(lines[2]["error"]["message"].as_str().unwrap().contains(&folder), "{}", lines[2]);
    let run = qscore_within(60, &dir, &["score", "--models-dir", models_arg, "--model", MODEL, "--manifest", "fifo"]);
    assert!(!run.status.success() && stderr(&run).contains("FIFO"), "{}", stderr(&run));
    let run = qscore_within(60, &dir, &["drift", "--models-dir", models_arg, "--reference", MODEL, "--scores", "fifo"]);
    assert!(!run.status.success() && stderr(&run).contains("FIFO"), "{}", stderr(&run));
    std::fs::remove_dir_all(&dir).unwrap();
}

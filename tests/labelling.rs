//! Feeding labelling queues. The Label Studio ML backend against a local stand-in of Label
//! Studio's file host: a `/predict` request in Label Studio's format
//! (tests/fixtures/labelstudio/predict.json) is answered with scores that put the riskiest image
//! first when sorted ascending, as the Data Manager sorts; URLs on any other host are refused per
//! task, and never fetched. Offline, `qscore score --sort risk`; online, `--flagged-webhook`.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
};

use common::{Server, fixture};
use serde_json::Value;

/// Every request a stand-in saw, as `(path_and_query, authorized)`.
type Seen = Arc<Mutex<Vec<(String, bool)>>>;

/// What a stand-in answers: a status, an optional `Location`, a body.
type Answer = (u16, Option<String>, Vec<u8>);

/// A loopback HTTP/1.1 stand-in that answers each GET with `answer(path_and_query, authorized)`
/// and records every request as `(path_and_query, authorized)`; authorized means it carried
/// `Authorization: Token ls-secret`, and any other Authorization header is recorded as such too.
/// Each connection is answered on its own thread, so a slow answer holds only its own.
fn stand_in(answer: impl Fn(&str, bool) -> Answer + Send + Sync + 'static) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answer = Arc::new(answer);
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (log, answer) = (Arc::clone(&log), Arc::clone(&answer));
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                let (mut authorized, mut any_auth) = (false, false);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let line = line.to_ascii_lowercase();
                    authorized |= line.starts_with("authorization: token ls-secret");
                    any_auth |= line.starts_with("authorization:");
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
                log.lock().unwrap().push((path.clone(), any_auth));
                let (status, location, body) = answer(&path, authorized);
                let location = location.map(|l| format!("Location: {l}\r\n")).unwrap_or_default();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\n{location}Content-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .and_then(|()| stream.write_all(&body));
            });
        }
    });
    (base, seen)
}

/// The fmnist fixture `<class>/<file>` named by `<class>-<file>`.
fn fmnist_file(name: &str) -> Option<Vec<u8>> {
    let (class, file) = name.split_once('-')?;
    std::fs::read(fixture(&format!("fmnist/{class}/{file}"))).ok()
}

/// Serves `/data/upload/7/<class>-<file>` from the fmnist fixtures, to requests carrying
/// `Authorization: Token ls-secret`; records every request.
fn file_host() -> (String, Seen) {
    stand_in(|path, authorized| {
        match path.strip_prefix("/data/upload/7/").filter(|_| authorized).and_then(fmnist_file) {
            Some(b) => (200, None, b),
            None => (401, None, Vec::new()),
        }
    })
}

#[test]
fn predict_sorts_the_riskiest_first_and_fetches_only_from_label_studio() {
    let (base, seen) = file_host();
    let s =
        Server::start(&["--model", "fmnist-simclr", "--label-studio-url", &base, "--label-studio-token", "ls-secret"]);
    let health: Value = s.get("/health").json().unwrap();
    assert_eq!(health["status"], "UP");
    let setup: Value = s
        .client()
        .post(format!("{}/setup", s.url))
        .json(&serde_json::json!({"project": "7"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(setup["model_version"], "fmnist-simclr@1.0.0");

    let request = std::fs::read_to_string(fixture("labelstudio/predict.json")).unwrap();
    let r = s
        .client()
        .post(format!("{}/predict", s.url))
        .header("content-type", "application/json")
        .body(request)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = r.json().unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "one prediction per task, in order");
    let score = |i: usize| results[i]["score"].as_f64().unwrap_or_else(|| panic!("task {i}: {}", results[i]));
    let (trouser, shirt, bag) = (score(0), score(1), score(2));
    // The shirt the probe takes for a coat is the riskiest: lowest score, first in ascending order.
    assert!(shirt < trouser && shirt < bag, "shirt {shirt}, trouser {trouser}, bag {bag}");
    let v1: Value = s
        .post_raw("/v1/score", "image/png", std::fs::read(fixture("fmnist/shirt/t10k-00026.png")).unwrap())
        .json()
        .unwrap();
    assert!((shirt - (1.0 - v1["p_misclassified"].as_f64().unwrap())).abs() < 1e-6, "score = 1 - p_misclassified");
    for i in [3, 4] {
        assert!(results[i]["score"].is_null());
        assert_eq!(results[i]["error"]["code"], "url_refused", "{}", results[i]);
        assert!(results[i]["error"]["message"].as_str().unwrap().contains("refused"), "{}", results[i]);
    }
    let fetched = seen.lock().unwrap().clone();
    assert_eq!(fetched.len(), 3, "only the three Label Studio images were fetched: {fetched:?}");

    // Without the token, Label Studio's host refuses, and the task says so.
    let s2 = Server::start(&["--model", "fmnist-simclr", "--label-studio-url", &base]);
    let one = serde_json::json!({"tasks": [{"id": 1, "data": {"image": "/data/upload/7/bag-t10k-00030.png"}}]});
    let r: Value = s2.client().post(format!("{}/predict", s2.url)).json(&one).send().unwrap().json().unwrap();
    assert_eq!(r["results"][0]["error"]["code"], "fetch_failed", "{r}");
    assert!(r["results"][0]["error"]["message"].as_str().unwrap().contains("401"), "{r}");
}

/// Posts a `/predict` body and returns its `results`.
fn predict(s: &Server, body: &Value) -> Vec<Value> {
    let r = s.client().post(format!("{}/predict", s.url)).json(body).send().unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = r.json().unwrap();
    r["results"].as_array().unwrap().clone()
}

fn ls_server(base: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--model", "fmnist-simclr", "--label-studio-url", base, "--label-studio-token", "ls-secret"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The image is the field the label config's `<Image value="$...">` names, never a caption that
/// comes first; several images (`valueList`, several tags) score as the riskiest; a task whose
/// field is missing gets its own `unresolved_image` error and the others are scored; `/setup`'s
/// config serves requests that come without one.
#[test]
fn predict_reads_the_image_the_label_config_names() {
    let (base, seen) = file_host();
    let s = ls_server(&base, &[]);
    let config = r#"<View><Text name="cap" value="$caption"/><Image name="img" value="$photo"/><Choices name="c" toName="img"><Choice value="shirt"/></Choices></View>"#;
    let results = predict(
        &s,
        &serde_json::json!({"tasks": [
            {"id": 1, "data": {"caption": "a cat on a blanket", "photo": "/data/upload/7/shirt-t10k-00026.png"}},
            {"id": 2, "data": {"caption": "no photo here"}},
            {"id": 3, "data": {"caption": "a bag", "photo": "/data/upload/7/bag-t10k-00030.png"}},
            {"id": 4, "data": {"caption": "a trouser", "photo": "/data/upload/7/trouser-t10k-00002.png"}}],
            "label_config": config, "project": "7.1764230400"}),
    );
    let score = |r: &Value| r["score"].as_f64().unwrap_or_else(|| panic!("{r}"));
    let (shirt, bag, trouser) = (score(&results[0]), score(&results[2]), score(&results[3]));
    assert!(shirt < bag && shirt < trouser, "the shirt is the riskiest: {results:?}");
    assert!(results[1]["score"].is_null());
    assert_eq!(results[1]["error"]["code"], "unresolved_image", "{}", results[1]);
    assert!(results[1]["error"]["message"].as_str().unwrap().contains("no `photo` field"), "{}", results[1]);
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(paths.len(), 3, "only the photos were fetched, never a caption: {paths:?}");
    assert!(paths.iter().all(|p| p.starts_with("/data/upload/7/")), "{paths:?}");

    // /setup tells the project's config; /predict without one uses it. Several image tags and a
    // valueList: the task scores as its riskiest image.
    let multi = r#"<view><IMAGE name="f" value="$front"/><Image name="p" valueList="$pages"/></view>"#;
    let r = s.client().post(format!("{}/setup", s.url)).json(&serde_json::json!({"project": "8.1764230400", "schema": multi, "hostname": "http://elsewhere.example", "access_token": "x"})).send().unwrap();
    assert_eq!(r.status(), 200);
    let results = predict(
        &s,
        &serde_json::json!({"tasks": [{"id": 9, "data": {"pages": ["/data/upload/7/bag-t10k-00030.png", "/data/upload/7/shirt-t10k-00026.png"], "front": "/data/upload/7/trouser-t10k-00002.png"}}],
            "project": "8.1764230400"}),
    );
    assert!((score(&results[0]) - shirt).abs() < 1e-9, "riskiest of three: {results:?} vs {shirt}");
    // A valueList item that is not a string fails its task, never silently dropped.
    let results = predict(
        &s,
        &serde_json::json!({"tasks": [{"id": 10, "data": {"pages": ["/data/upload/7/bag-t10k-00030.png", 5], "front": "/data/upload/7/trouser-t10k-00002.png"}}],
            "project": "8.1764230400"}),
    );
    assert_eq!(results[0]["error"]["code"], "unresolved_image", "{}", results[0]);
    assert!(
        results[0]["error"]["message"].as_str().unwrap().contains("item 1 (counting from 0) is a number"),
        "{}",
        results[0]
    );
    // No config anywhere: `data.image` or the only field, and the error says so.
    let results = predict(
        &s,
        &serde_json::json!({"tasks": [{"id": 1, "data": {"caption": "a cat", "photo": "/data/upload/7/shirt-t10k-00026.png"}},
                                       {"id": 2, "data": {"photo": "/data/upload/7/shirt-t10k-00026.png"}}]}),
    );
    assert_eq!(results[0]["error"]["code"], "unresolved_image", "{}", results[0]);
    assert!(results[0]["error"]["message"].as_str().unwrap().contains("no label config"), "{}", results[0]);
    assert!((score(&results[1]) - shirt).abs() < 1e-9);
    // A malformed or hostile config is the whole request's error.
    let r = s
        .client()
        .post(format!("{}/predict", s.url))
        .json(&serde_json::json!({"tasks": [], "label_config": "<!DOCTYPE x [<!ENTITY a \"b\">]><View/>"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("DOCTYPE"));
}

/// Cloud storage URIs (`s3://`, `gs://`, `azure-blob://`) go to Label Studio's
/// `/tasks/{id}/presign/?fileuri=<urlsafe base64>` with the token; its redirect is followed only
/// to a `--label-studio-storage-hosts` host, without the token, a bounded number of hops.
#[test]
fn cloud_storage_uris_are_fetched_through_presign_without_the_token() {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::URL_SAFE;
    let (storage, storage_seen) = stand_in(|path, _| {
        match path.strip_prefix("/bucket/").and_then(|p| p.split_once('?')).and_then(|(name, _)| fmnist_file(name)) {
            Some(b) => (200, None, b),
            None => (404, None, Vec::new()),
        }
    });
    let storage_port = storage.rsplit(':').next().unwrap().to_owned();
    let ls_base = Arc::new(Mutex::new(String::new()));
    let me = Arc::clone(&ls_base);
    let (ls, ls_seen) = stand_in(move |path, authorized| {
        let Some((_, fileuri)) = path.split_once("/presign/?fileuri=").filter(|_| authorized) else {
            return (401, None, Vec::new());
        };
        let uri = String::from_utf8(b64.decode(fileuri).unwrap()).unwrap();
        let to = |l: String| (302, Some(l), Vec::new());
        match uri.split_once("://").unwrap() {
            ("s3", "bucket/api") => to(format!("{}/api/projects", me.lock().unwrap())),
            ("s3", key) => to(format!("{storage}/{key}?X-Amz-Signature=topsecret")),
            ("gs", key) if key.starts_with("bucket/inline/") => (200, None, fmnist_file(&key[14..]).unwrap()),
            ("gs", key) => to(format!("http://localhost:{storage_port}/{key}?sig=1")),
            ("azure-blob", _) => (307, Some(path.to_owned()), Vec::new()),
            _ => (404, None, Vec::new()),
        }
    });
    *ls_base.lock().unwrap() = ls.clone();
    let s = ls_server(&ls, &["--label-studio-storage-hosts", "127.0.0.1,*.s3.amazonaws.com"]);
    let results = predict(
        &s,
        &serde_json::json!({"tasks": [
            {"id": 1, "data": {"image": "s3://bucket/shirt-t10k-00026.png"}},
            {"id": 2, "data": {"image": "gs://bucket/inline/bag-t10k-00030.png"}},
            {"id": 3, "data": {"image": "gs://bucket/bag-t10k-00030.png"}},
            {"id": 4, "data": {"image": "azure-blob://container/loop.png"}},
            {"id": 5, "data": {"image": "s3://bucket/api"}},
            {"id": "not-a-number", "data": {"image": "s3://bucket/shirt-t10k-00026.png"}},
            {"id": 7, "data": {"image": "S3://bucket/shirt-t10k-00026.png"}},
            {"id": 1_180_591_620_717_411_303_424.0_f64, "data": {"image": "s3://bucket/shirt-t10k-00026.png"}}],
            "label_config": "<View><Image name=\"i\" value=\"$image\"/></View>"}),
    );
    assert!(results[0]["score"].as_f64().is_some(), "via the storage host: {}", results[0]);
    assert!(results[1]["score"].as_f64().is_some(), "bytes from Label Studio itself: {}", results[1]);
    let code = |i: usize| results[i]["error"]["code"].as_str().unwrap_or_else(|| panic!("{}", results[i])).to_owned();
    let message = |i: usize| results[i]["error"]["message"].as_str().unwrap().to_owned();
    assert_eq!(code(2), "url_refused");
    assert!(message(2).contains("--label-studio-storage-hosts") && !message(2).contains("sig=1"), "{}", message(2));
    assert_eq!(code(3), "fetch_failed");
    assert!(message(3).contains("redirects"), "{}", message(3));
    assert_eq!(code(4), "url_refused", "a redirect back to the API is refused: {}", results[4]);
    assert_eq!(code(5), "unresolved_image");
    assert!(results[6]["score"].as_f64().is_some(), "the scheme in upper case: {}", results[6]);
    assert_eq!(code(7), "unresolved_image", "an id past u64 (a float) names no task");
    assert!(message(7).contains("whole number"), "{}", message(7));
    assert!(results.iter().all(|r| !r.to_string().contains("topsecret")));
    let storage_seen = storage_seen.lock().unwrap().clone();
    assert_eq!(storage_seen.len(), 2, "{storage_seen:?}");
    assert!(!storage_seen[0].1, "the token never goes to the storage host");
    let ls_seen = ls_seen.lock().unwrap().clone();
    let want = format!("/tasks/1/presign/?fileuri={}", b64.encode("s3://bucket/shirt-t10k-00026.png"));
    assert!(ls_seen.iter().any(|(p, auth)| *p == want && *auth), "{ls_seen:?}");
    assert!(ls_seen.iter().all(|(p, _)| p.contains("/presign/")), "only the presign endpoint: {ls_seen:?}");
    assert_eq!(ls_seen.iter().filter(|(p, _)| p.starts_with("/tasks/4/")).count(), 4, "1 + 3 redirects");
}

/// A presign redirect to an allowed storage host that then fails (nothing listens there): the
/// task's error names the host and path, never the presigned URL's query (its signature).
#[test]
fn a_failed_storage_fetch_never_shows_the_presigned_query() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (ls, _) = stand_in(move |path, _| {
        if path.contains("/presign/?fileuri=") {
            let to =
                format!("http://127.0.0.1:{closed}/obj.png?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=SECRETSIG");
            (302, Some(to), Vec::new())
        } else {
            (404, None, Vec::new())
        }
    });
    let s = ls_server(&ls, &["--label-studio-storage-hosts", "127.0.0.1"]);
    let results = predict(
        &s,
        &serde_json::json!({"tasks": [{"id": 1, "data": {"image": "s3://bucket/obj.png"}}],
            "label_config": "<View><Image name=\"i\" value=\"$image\"/></View>"}),
    );
    assert_eq!(results[0]["error"]["code"], "fetch_failed", "{}", results[0]);
    let message = results[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("127.0.0.1:{closed}/obj.png")), "{message}");
    assert!(!message.contains("SECRETSIG") && !message.contains("AKIAEXAMPLE"), "{message}");
    assert!(!s.log().contains("SECRETSIG"), "{}", s.log());
}

/// Serves `/data/upload/7/slow-...` after `delay`, and the bag fixture at any other upload path.
fn slow_host(delay: std::time::Duration) -> String {
    let bag = fmnist_file("bag-t10k-00030.png").unwrap();
    stand_in(move |path, _| {
        if path.contains("slow") {
            std::thread::sleep(delay);
        }
        (200, None, bag.clone())
    })
    .0
}

/// A slow image holds only its own fetch slot: three images slower than
/// `--label-studio-timeout-ms` among 40 tasks are each their own `fetch_failed`, the other 37 are
/// scored, well within the request's deadline. An image still on its way when the deadline comes
/// fails its task, not the request.
#[test]
fn slow_images_fail_only_their_own_tasks() {
    use std::time::{Duration, Instant};
    let config = r#"<View><Image name="i" value="$image"/></View>"#;
    let tasks = |n: usize, slow: &[usize]| -> Value {
        let tasks: Vec<Value> = (0..n)
            .map(|i| {
                let name = if slow.contains(&i) { "slow" } else { "ok" };
                serde_json::json!({"id": i + 1, "data": {"image": format!("/data/upload/7/{name}-{i}.png")}})
            })
            .collect();
        serde_json::json!({"tasks": tasks, "label_config": config})
    };
    let base = slow_host(Duration::from_secs(6));
    // Ordered fetching stalled 8 at a time behind each slow head: 3 x 1.5 s, past the 4 s deadline.
    let s = ls_server(&base, &["--label-studio-timeout-ms", "1500", "--request-timeout-ms", "4000"]);
    let started = Instant::now();
    let results = predict(&s, &tasks(40, &[0, 12, 24]));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(results.len(), 40);
    for (i, r) in results.iter().enumerate() {
        if [0, 12, 24].contains(&i) {
            assert_eq!(r["error"]["code"], "fetch_failed", "{i}: {r}");
            assert!(r["error"]["message"].as_str().unwrap().contains("timed out"), "{i}: {r}");
        } else {
            assert!(r["score"].as_f64().is_some(), "{i}: {r}");
        }
    }
    // A per-image timeout longer than the request's: the image still on its way fails its task.
    let s = ls_server(&base, &["--label-studio-timeout-ms", "60000", "--request-timeout-ms", "3000"]);
    let started = Instant::now();
    let results = predict(&s, &tasks(5, &[2]));
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    for (i, r) in results.iter().enumerate() {
        if i == 2 {
            assert_eq!(r["error"]["code"], "fetch_failed", "{r}");
            assert!(r["error"]["message"].as_str().unwrap().contains("deadline"), "{r}");
        } else {
            assert!(r["score"].as_f64().is_some(), "{i}: {r}");
        }
    }
}

/// The token goes only to Label Studio's media paths: the API, or a path that normalises to it,
/// is refused per task without any request (no oracle on the API). `data:` URIs are decoded in
/// place.
#[test]
fn the_token_goes_only_to_label_studio_media_paths() {
    use base64::Engine as _;
    let (base, seen) = file_host();
    let s = ls_server(&base, &[]);
    let shirt = std::fs::read(fixture("fmnist/shirt/t10k-00026.png")).unwrap();
    let data_uri = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&shirt));
    let refused = [
        "/api/projects".to_owned(),
        "/api/current-user/whoami".to_owned(),
        format!("{base}/api/projects"),
        "/data/upload/../../api/projects".to_owned(),
        "/data/upload/%2e%2e/%2E%2E/api/projects".to_owned(),
        "/data/upload/..%2f..%2fapi/projects".to_owned(),
        "\\data\\upload\\..\\..\\api\\projects".to_owned(),
        "/data/upload//7/x.png".to_owned(),
        "/data/local-files/?d=../../etc/passwd".to_owned(),
        "/tasks/1/presign/".to_owned(),
    ];
    let mut tasks: Vec<Value> =
        refused.iter().enumerate().map(|(i, r)| serde_json::json!({"id": i, "data": {"image": r}})).collect();
    tasks.push(serde_json::json!({"id": 99, "data": {"image": data_uri}}));
    tasks.push(serde_json::json!({"id": 100, "data": {"image": "data:text/html;base64,PGI+"}}));
    let results = predict(&s, &serde_json::json!({"tasks": tasks}));
    for (r, reference) in results.iter().zip(&refused) {
        assert_eq!(r["error"]["code"], "url_refused", "{reference}: {r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("media paths"), "{reference}: {r}");
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing was asked of Label Studio: {:?}", seen.lock().unwrap());
    let v1: Value = s.post_raw("/v1/score", "image/png", shirt).json().unwrap();
    let inline = results[refused.len()]["score"].as_f64().unwrap_or_else(|| panic!("{}", results[refused.len()]));
    assert!((inline - (1.0 - v1["p_misclassified"].as_f64().unwrap())).abs() < 1e-6);
    assert_eq!(results[refused.len() + 1]["error"]["code"], "unresolved_image");
}

/// Offline: `qscore score --sort risk` walks a folder and writes the riskiest images first, as
/// CSV or JSON lines, ready to import into any queue; a file that cannot be scored comes last
/// with its error, and the exit status says something failed.
#[test]
fn score_sorts_a_folder_riskiest_first_for_queues() {
    let run = |format: &str| {
        common::qscore_bin()
            .args(["score", "--model", "fmnist-simclr", "--sort", "risk", "--format", format])
            .arg(fixture("fmnist"))
            .arg(fixture("bad/truncated.jpg"))
            .output()
            .unwrap()
    };
    let out = run("csv");
    assert_eq!(out.status.code(), Some(1), "the truncated file fails: {}", String::from_utf8_lossy(&out.stderr));
    let mut reader = csv::Reader::from_reader(out.stdout.as_slice());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(header[..3], ["file", "risk", "q_score"]);
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 201);
    let risks: Vec<f64> = rows[..200].iter().map(|r| r[1].parse().unwrap()).collect();
    assert!(risks.windows(2).all(|w| w[0] >= w[1]), "not riskiest first");
    assert_eq!(&rows[0][4], "true", "the riskiest image is flagged");
    assert!(rows[200][0].ends_with("truncated.jpg") && rows[200][7].starts_with("undecodable_image"));

    let out = run("jsonl");
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 201);
    assert!((lines[0]["risk"].as_f64().unwrap() - risks[0]).abs() < 1e-9);
    let p = lines[0]["p_misclassified"].as_f64().unwrap();
    assert!((lines[0]["risk"].as_f64().unwrap() - p).abs() < 1e-6, "risk = p_misclassified for a calibrated model");
}

/// A loopback endpoint that records each POST body and answers `status` after `delay`.
fn receiver(status: u16, delay: std::time::Duration) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/flagged", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&bodies);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = std::io::Read::read_exact(&mut reader, &mut body);
                log.lock().unwrap().push(String::from_utf8_lossy(&body).to_string());
                std::thread::sleep(delay);
                let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            });
        }
    });
    (url, bodies)
}

fn fmnist_batch(s: &Server) -> Value {
    let mut form = reqwest::blocking::multipart::Form::new();
    for class in ["shirt", "coat", "pullover", "trouser"] {
        let mut files: Vec<_> =
            std::fs::read_dir(fixture(&format!("fmnist/{class}"))).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let name = format!("{class}/{}", f.file_name().unwrap().to_str().unwrap());
            form = form
                .part("image", reqwest::blocking::multipart::Part::bytes(std::fs::read(&f).unwrap()).file_name(name));
        }
    }
    s.client()
        .post(format!("{}/v1/score/batch?model=fmnist-simclr", s.url))
        .multipart(form)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// `--flagged-webhook`: every flagged answer is POSTed with its id and scores, never the image.
#[test]
fn flagged_answers_are_pushed_to_the_webhook() {
    let (url, bodies) = receiver(200, std::time::Duration::ZERO);
    let s = Server::start(&["--flagged-webhook", &url]);
    let b = fmnist_batch(&s);
    let flagged: Vec<&str> = b["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["likely_misclassified"] == true)
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(!flagged.is_empty());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while bodies.lock().unwrap().len() < flagged.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} events arrived",
            bodies.lock().unwrap().len(),
            flagged.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let events: Vec<Value> = bodies.lock().unwrap().iter().map(|b| serde_json::from_str(b).unwrap()).collect();
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want = flagged.clone();
    want.sort_unstable();
    assert_eq!(ids, want, "exactly the flagged images, by id");
    for e in &events {
        assert_eq!(e["model"], "fmnist-simclr");
        assert!(e["p_misclassified"].as_f64().is_some() && e["risk_source"] == "max_softmax");
        assert!(e.as_object().unwrap().len() <= 8 && e.to_string().len() < 400, "never the image: {e}");
    }
}

/// A slow, failing endpoint never slows scoring: each event gets at most 3 tries, then counts
/// as failed.
#[test]
fn a_failing_webhook_never_slows_scoring() {
    let (url, bodies) = receiver(500, std::time::Duration::from_secs(2));
    let s = Server::start(&["--flagged-webhook", &url, "--flagged-webhook-timeout-ms", "500"]);
    let start = std::time::Instant::now();
    let b = fmnist_batch(&s);
    assert!(b["summary"]["flagged"].as_u64().unwrap() > 0);
    for _ in 0..5 {
        let _ = fmnist_batch(&s);
    }
    assert!(
        start.elapsed() < std::time::Duration::from_secs(15),
        "scoring waited for the webhook: {:?}",
        start.elapsed()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metrics = s.get("/metrics").text().unwrap();
        if metrics.contains("qscore_webhook_events_total{outcome=\"failed\"}") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no event was given up on:\n{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let first_id = serde_json::from_str::<Value>(&bodies.lock().unwrap()[0]).unwrap()["id"].clone();
    let tries =
        bodies.lock().unwrap().iter().filter(|b| serde_json::from_str::<Value>(b).unwrap()["id"] == first_id).count();
    assert_eq!(tries, 3, "bounded retries");
}

/// A real Label Studio: `make tools` installs the pinned release in `.venv-labelstudio` and
/// migrates a template data folder once; each run copies it to a fresh folder, starts Label
/// Studio on loopback in its own process group (offline: no version check, no analytics; loopback ML backends allowed), and
/// kills the group on drop.
struct LabelStudioProcess {
    child: std::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

/// The template's user token (Makefile, `.venv-labelstudio/installed`).
const LS_TOKEN: &str = "qscore-test-token";

impl LabelStudioProcess {
    fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let venv = common::root().join(".venv-labelstudio");
        let template = venv.join("template");
        assert!(
            template.join("label_studio.sqlite3").exists(),
            "Label Studio is needed for this test: `make tools` installs it into .venv-labelstudio"
        );
        let dir = std::env::temp_dir().join(format!("qscore-labelstudio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let copied = std::process::Command::new("cp").arg("-a").arg(&template).arg(&dir).status().unwrap();
        assert!(copied.success());
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
        let log = std::fs::File::create(dir.join("label-studio.log")).unwrap();
        let child = std::process::Command::new(venv.join("bin/label-studio"))
            .args(["start", "--no-browser", "--internal-host", "127.0.0.1", "--port", &port])
            .env("LABEL_STUDIO_BASE_DATA_DIR", &dir)
            .envs([
                ("LATEST_VERSION_CHECK", "false"),
                ("COLLECT_ANALYTICS", "false"),
                ("LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "true"),
                ("ML_BLOCK_LOCAL_IP", "false"),
                ("SSRF_PROTECTION_ENABLED", "false"),
            ])
            .process_group(0)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start label-studio");
        let ls = Self { child, dir, url: format!("http://127.0.0.1:{port}") };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        let client = reqwest::blocking::Client::new();
        while client.get(format!("{}/health", ls.url)).send().map(|r| r.status() != 200).unwrap_or(true) {
            assert!(std::time::Instant::now() < deadline, "Label Studio did not start in 90 s:\n{}", ls.log());
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        ls
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("label-studio.log")).unwrap_or_default();
        log[log.len().saturating_sub(4000)..].to_owned()
    }

    /// A call to Label Studio's API with the token; panics with its answer unless 2xx.
    fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .unwrap()
            .request(method.clone(), format!("{}{path}", self.url))
            .header("authorization", format!("Token {LS_TOKEN}"));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().unwrap();
        let status = r.status();
        let text = r.text().unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}\n{}", self.log());
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

impl Drop for LabelStudioProcess {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let kill = |signal: &str| {
            let _ = std::process::Command::new("kill")
                .args([signal, "--", &group])
                .stderr(std::process::Stdio::null())
                .status();
        };
        kill("-TERM");
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        kill("-KILL");
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The main proof: a real Label Studio project whose image tag reads `$photo` (beside a
/// `$caption` text), images uploaded through its import API, qscore connected as its ML
/// backend; Label Studio asks for predictions and stores qscore's scores, riskiest lowest. A
/// `data:` URI task is scored, and a task pointing at Label Studio's API is refused.
#[test]
fn a_real_label_studio_stores_the_riskiest_first() {
    use reqwest::Method;
    let started = std::time::Instant::now();
    let ls = LabelStudioProcess::start();
    let ls_ready = started.elapsed();
    let qscore =
        Server::start(&["--model", "fmnist-simclr", "--label-studio-url", &ls.url, "--label-studio-token", LS_TOKEN]);
    let image_only = r#"<View><Image name="img" value="$photo"/><Choices name="c" toName="img"><Choice value="shirt"/><Choice value="other"/></Choices></View>"#;
    let project = ls.api(
        Method::POST,
        "/api/projects",
        Some(serde_json::json!({"title": "qscore risk", "label_config": image_only})),
    );
    let id = project["id"].as_u64().unwrap();

    // Upload three images through the import API (one data key while uploading files).
    let files = ["shirt/t10k-00026.png", "trouser/t10k-00002.png", "bag/t10k-00030.png"];
    let mut form = reqwest::blocking::multipart::Form::new();
    for (i, f) in files.iter().enumerate() {
        let name = f.replace('/', "-");
        form = form.part(
            format!("file{i}"),
            reqwest::blocking::multipart::Part::bytes(std::fs::read(fixture(&format!("fmnist/{f}"))).unwrap())
                .file_name(name),
        );
    }
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/api/projects/{id}/import", ls.url))
        .header("authorization", format!("Token {LS_TOKEN}"))
        .multipart(form)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    let uploaded = ls.api(Method::GET, &format!("/api/tasks?project={id}&fields=all"), None);
    let mut urls = std::collections::HashMap::new();
    for t in uploaded["tasks"].as_array().unwrap() {
        let url = t["data"]["photo"].as_str().unwrap().to_owned();
        let class = files.iter().find(|f| url.ends_with(&f.replace('/', "-"))).unwrap().split('/').next().unwrap();
        urls.insert(class.to_owned(), url);
        ls.api(Method::DELETE, &format!("/api/tasks/{}", t["id"]), None);
    }
    assert_eq!(urls.len(), 3, "{uploaded}");

    // The project's real config: a caption first, the image in `$photo`.
    let config = image_only.replace("<View>", r#"<View><Text name="cap" value="$caption"/>"#);
    ls.api(Method::PATCH, &format!("/api/projects/{id}"), Some(serde_json::json!({"label_config": config})));
    use base64::Engine as _;
    let coat = std::fs::read(fixture("fmnist/coat/t10k-00056.png")).ok();
    let mut tasks: Vec<Value> = ["shirt", "trouser", "bag"]
        .iter()
        .map(|c| serde_json::json!({"caption": format!("a {c} on a blanket"), "photo": urls[*c]}))
        .collect();
    let inline = coat.or_else(|| std::fs::read(fixture("fmnist/bag/t10k-00018.png")).ok()).unwrap();
    let inline_uri = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&inline));
    tasks.push(serde_json::json!({"caption": "inline", "photo": inline_uri}));
    tasks.push(serde_json::json!({"caption": "the API", "photo": "/api/projects"}));
    ls.api(Method::POST, &format!("/api/projects/{id}/import"), Some(Value::Array(tasks)));
    let imported = ls.api(Method::GET, &format!("/api/tasks?project={id}&fields=all"), None);
    let by_caption: std::collections::HashMap<String, u64> = imported["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["data"]["caption"].as_str().unwrap().to_owned(), t["id"].as_u64().unwrap()))
        .collect();
    assert_eq!(by_caption.len(), 5, "{imported}");

    // Connect qscore (Label Studio calls /health and /setup), then ask for every task's prediction.
    let backend =
        ls.api(Method::POST, "/api/ml", Some(serde_json::json!({"url": qscore.url, "project": id, "title": "qscore"})));
    assert_eq!(backend["readable_state"], "Connected", "{backend}");
    assert_eq!(backend["model_version"], "fmnist-simclr@1.0.0");
    let action = ls.api(
        Method::POST,
        &format!("/api/dm/actions?id=retrieve_tasks_predictions&project={id}"),
        Some(serde_json::json!({"selectedItems": {"all": true, "excluded": []}})),
    );
    assert!(action["detail"].as_str().unwrap_or("").contains("5 predictions"), "{action}");

    let stored = ls.api(Method::GET, &format!("/api/predictions?project={id}"), None);
    let score = |caption: &str| {
        let task = by_caption[caption];
        let p = stored
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["task"] == task)
            .unwrap_or_else(|| panic!("{caption}: {stored}"));
        assert_eq!(p["model_version"], "fmnist-simclr@1.0.0");
        p["score"].as_f64()
    };
    let (shirt, trouser, bag) = (
        score("a shirt on a blanket").expect("the photo, not the caption"),
        score("a trouser on a blanket").unwrap(),
        score("a bag on a blanket").unwrap(),
    );
    assert!(shirt < trouser && shirt < bag, "riskiest lowest: shirt {shirt}, trouser {trouser}, bag {bag}");
    let v1: Value = qscore
        .post_raw("/v1/score", "image/png", std::fs::read(fixture("fmnist/shirt/t10k-00026.png")).unwrap())
        .json()
        .unwrap();
    assert!((shirt - (1.0 - v1["p_misclassified"].as_f64().unwrap())).abs() < 1e-6);
    assert!(score("inline").is_some(), "the data: URI task is scored");
    assert!(score("the API").is_none(), "a task pointing at the API is refused, not fetched");
    assert!(!qscore.log().contains("api/projects\" answered"), "{}", qscore.log());
    eprintln!("Label Studio ready in {ls_ready:?}; whole test {:?}", started.elapsed());
}

//! Every bad input gets its JSON error with the right status, and the server keeps serving.

mod common;

use common::{Server, assert_error, read};
use reqwest::blocking::multipart::{Form, Part};

#[test]
fn bad_images_are_refused_with_the_right_status() {
    let s = Server::start(&[]);
    let cases: [(&str, Vec<u8>, u16, &str); 6] = [
        ("empty.jpg", Vec::new(), 400, "empty_image"),
        ("truncated.jpg", read("bad/truncated.jpg"), 422, "undecodable_image"),
        ("corrupt.jpg", read("bad/corrupt.jpg"), 422, "undecodable_image"),
        ("text.jpg", read("bad/not_an_image.txt"), 415, "unsupported_image_format"),
        ("tiny.ppm", read("bad/tiny.ppm"), 415, "unsupported_image_format"),
        ("bomb.png", read("bad/bomb_100000x100000.png"), 413, "too_many_pixels"),
    ];
    for (name, bytes, status, code) in cases {
        assert_error(s.post_image("/v1/score", name, bytes.clone()), status, code);
        assert_error(s.post_raw("/v1/score", "image/jpeg", bytes.clone()), status, code);
        assert_error(s.post_image("/v1/embed", name, bytes), status, code);
        s.assert_ready();
    }
    let metrics = s.get("/metrics").text().unwrap();
    assert!(
        metrics.contains("qscore_images_total{model=\"mobilenet_v2-imagenet\",outcome=\"rejected\"} 18"),
        "{metrics}"
    );
}

#[test]
fn malformed_requests_are_refused() {
    let s = Server::start(&[]);
    let c = s.client();
    let url = |p: &str| format!("{}{p}", s.url);

    assert_error(s.post_raw("/v1/score", "image/jpeg", Vec::new()), 400, "empty_image");
    assert_error(s.post_raw("/v1/score", "text/plain", b"hello".to_vec()), 415, "unsupported_media_type");
    assert_error(
        c.post(url("/v1/score")).body(read("photos/china.jpg")).send().unwrap(),
        415,
        "unsupported_media_type",
    );
    let form = Form::new().part("file", Part::bytes(read("photos/china.jpg")).file_name("china.jpg"));
    assert_error(c.post(url("/v1/score")).multipart(form).send().unwrap(), 400, "unexpected_field");
    let form = Form::new().text("note", "no image here");
    assert_error(c.post(url("/v1/score/batch")).multipart(form).send().unwrap(), 400, "unexpected_field");
    assert_error(
        c.post(url("/v1/score"))
            .header("content-type", "multipart/form-data; boundary=xyz")
            .body("--xyz--\r\n")
            .send()
            .unwrap(),
        400,
        "missing_image",
    );
    assert_error(
        c.post(url("/v1/score")).header("content-type", "multipart/form-data").body("garbage").send().unwrap(),
        400,
        "bad_request",
    );
    let two = Form::new()
        .part("image", Part::bytes(read("photos/china.jpg")).file_name("a.jpg"))
        .part("image", Part::bytes(read("photos/china.jpg")).file_name("b.jpg"));
    assert_error(c.post(url("/v1/score")).multipart(two).send().unwrap(), 400, "bad_request");
    assert_error(s.post_raw("/v1/score/batch", "application/json", b"{\"images\": [".to_vec()), 400, "bad_request");
    assert_error(s.post_raw("/v1/score/batch", "application/json", b"{\"images\": []}".to_vec()), 400, "missing_image");
    assert_error(s.post_image("/v1/score?model=nope", "china.jpg", read("photos/china.jpg")), 404, "unknown_model");
    assert_error(
        s.post_raw("/v1/score/batch?model=nope", "image/jpeg", read("photos/china.jpg")),
        404,
        "unknown_model",
    );
    // A misspelt parameter is refused, naming it, rather than answered by the default model.
    for path in ["/v1/score?modle=fmnist-simclr", "/v1/embed?model=fmnist-simclr&compresed=true"] {
        let body = assert_error(s.post_raw(path, "image/jpeg", read("photos/china.jpg")), 400, "bad_request");
        let misspelt = path.rsplit('&').next().unwrap().rsplit('?').next().unwrap().split('=').next().unwrap();
        assert!(body.to_string().contains(misspelt), "{path}: {body}");
    }
    let form = Form::new().part("image", Part::bytes(read("photos/china.jpg")).file_name("a.jpg"));
    assert_error(c.post(url("/v1/score/batch?modle=x")).multipart(form).send().unwrap(), 400, "bad_request");
    // A GET scores nothing: a browser's cache-busting parameter is fine there.
    assert_eq!(s.get("/v1/drift?_=123").status(), 200);
    // Under /v2 the answer is the KServe protocol's `{"error": "message"}`.
    let r = s.get("/v2/nothing");
    assert_eq!(r.status(), 404);
    assert!(r.json::<serde_json::Value>().unwrap()["error"].as_str().unwrap().contains("no such route"));
    assert_error(s.get("/v1/score"), 405, "method_not_allowed");
    s.assert_ready();
}

#[test]
fn request_limits_are_enforced() {
    let s = Server::start(&["--max-body-bytes", "400000", "--max-batch-images", "3", "--max-image-bytes", "200000"]);
    let big = read("photos/astronaut.png"); // 791,555 bytes
    assert!(big.len() > 400_000);
    assert_error(s.post_image("/v1/score", "astronaut.png", big.clone()), 413, "body_too_large");
    assert_error(s.post_raw("/v1/score", "image/png", big), 413, "body_too_large");
    // chelsea.png (240,512 bytes) fits the body limit but not the per-image one.
    assert_error(s.post_raw("/v1/score", "image/png", read("photos/chelsea.png")), 413, "image_too_large");

    let mut form = Form::new();
    for i in 0..4 {
        form = form.part("image", Part::bytes(read("formats/chelsea_q95.jpg")).file_name(format!("{i}.jpg")));
    }
    assert_error(
        s.client().post(format!("{}/v1/score/batch", s.url)).multipart(form).send().unwrap(),
        413,
        "too_many_images",
    );
    let images: Vec<_> = (0..4).map(|_| serde_json::json!({"data": "AAAA"})).collect();
    let r = s
        .client()
        .post(format!("{}/v1/score/batch", s.url))
        .json(&serde_json::json!({ "images": images }))
        .send()
        .unwrap();
    assert_error(r, 413, "too_many_images");

    let r = s.post_image("/v1/score", "rocket.jpg", read("photos/rocket.jpg"));
    assert_eq!(r.status(), 200, "a request within the limits still scores");
    s.assert_ready();
}

#[test]
fn pixel_limit_is_configurable() {
    let s = Server::start(&["--max-image-pixels", "200000"]);
    // china.jpg is 640 x 427 = 273,280 pixels.
    let v = assert_error(s.post_image("/v1/score", "china.jpg", read("photos/china.jpg")), 413, "too_many_pixels");
    assert!(v["error"]["message"].as_str().unwrap().contains("640x427"));
    assert_eq!(s.post_image("/v1/score", "chelsea.png", read("photos/chelsea.png")).status(), 200);
}

/// With room for 16 images in flight, a burst of 24 concurrent batches of 8 overflows: the
/// overflowing requests are answered 429 with Retry-After and a JSON error at once, the others
/// are scored whole, and the server stays ready.
#[test]
fn a_full_server_answers_429_with_retry_after() {
    let s = Server::start(&["--max-queued-images", "16", "--max-batch", "8"]);
    let photo = read("photos/rocket.jpg");
    let url = format!("{}/v1/score/batch", s.url);
    let answers: Vec<(u16, Option<String>, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..24)
            .map(|_| {
                let (url, photo, client) = (url.clone(), photo.clone(), s.client());
                scope.spawn(move || {
                    let mut form = Form::new();
                    for i in 0..8 {
                        form = form.part("image", Part::bytes(photo.clone()).file_name(format!("{i}.jpg")));
                    }
                    let r = client.post(url).multipart(form).send().unwrap();
                    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                    (r.status().as_u16(), retry, r.text().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut overloaded = 0;
    for (status, retry, body) in &answers {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        match status {
            200 => assert_eq!(v["summary"]["scored"], 8, "{body}"),
            429 => {
                assert_eq!(v["error"]["code"], "overloaded", "{body}");
                assert_eq!(retry.as_deref(), Some("1"));
                overloaded += 1;
            }
            _ => panic!("unexpected {status}: {body}"),
        }
    }
    assert!(overloaded > 0, "24 concurrent batches of 8 never overflowed room for 16 images");
    assert!(overloaded < answers.len(), "nothing was scored");
    assert_eq!(s.post_image("/v1/score", "rocket.jpg", photo).status(), 200);
    s.assert_ready();
}

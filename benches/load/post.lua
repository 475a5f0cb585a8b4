-- wrk script: POST one real JPEG photo as a raw image/jpeg body (both servers accept it).
local f = assert(io.open(os.getenv("LOAD_PHOTO") or "tests/fixtures/photos/china.jpg", "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/jpeg"

// Posts images as multipart `image` parts with Node's built-in fetch, FormData and Blob, and
// prints the status and the answer's body as JSON, for tests/clients.rs.
//
//     node multipart_client.mjs URL FILE...
import { readFileSync } from "node:fs";
import { basename } from "node:path";

const [url, ...files] = process.argv.slice(2);
const form = new FormData();
for (const f of files) {
  form.append("image", new Blob([readFileSync(f)], { type: "image/png" }), basename(f));
}
const response = await fetch(url, { method: "POST", body: form });
console.log(JSON.stringify({ status: response.status, body: await response.json() }));

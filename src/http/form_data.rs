//! The `Content-Disposition` header of a `multipart/form-data` part: its field name and file
//! name, read the way real clients write them.
//!
//! multer finds the parts (boundaries, headers, sizes) and this module reads what it leaves
//! to us: multer's own `name`/`filename` lookup matches the parameter names case-sensitively
//! (its `TODO` says so), gives up on `filename*`, and finds `name=` inside another
//! parameter's quoted value. Here the header is tokenised once, following RFC 7578 §4.2,
//! RFC 6266 §4.1 and RFC 2183:
//!
//! - the disposition type (`form-data`) and the parameter names are case-insensitive;
//! - values are tokens or quoted strings; spaces around `;` and `=` are allowed; a backslash
//!   escapes only a special character (`\"`, `\\`), as Go's `mime` package reads it, so a
//!   Windows path sent unescaped by a browser keeps its backslashes;
//! - `%XX` escapes in a quoted value are decoded (when the result is UTF-8): the WHATWG HTML
//!   standard's encoding of `"`, CR and LF as `%22`, `%0D`, `%0A`, which browsers, Node's
//!   `FormData`, curl (7.81+), urllib3 2 (Python requests) and httpx use, and aiohttp's
//!   `FormData`, which percent-encodes the whole file name (`quote(filename, "")`). A file
//!   name that really holds `%41` therefore reads as `A`;
//! - `filename*=UTF-8''...` (RFC 5987 / RFC 8187 ext-value, UTF-8 or ISO-8859-1) wins over
//!   `filename`, as RFC 6266 §4.3 asks; `name*` likewise;
//! - raw UTF-8 in a quoted value (browsers, Java) is kept as it is.

/// What a part's `Content-Disposition` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disposition {
    /// The disposition type is `form-data` (in any case).
    pub form_data: bool,
    /// The field name.
    pub name: Option<String>,
    /// The file name.
    pub filename: Option<String>,
}

impl Disposition {
    /// Reads a `Content-Disposition` header value. Never fails: what cannot be read is absent.
    pub fn parse(header: &[u8]) -> Self {
        let mut p = Cursor { s: header, i: 0 };
        p.skip_ws();
        let kind = p.token();
        let mut out = Disposition { form_data: kind.eq_ignore_ascii_case(b"form-data"), ..Default::default() };
        let (mut name_ext, mut filename_ext) = (None, None);
        loop {
            // Anything that is not `; name = value` is skipped up to the next `;`.
            p.skip_ws();
            match p.peek() {
                None => break,
                Some(b';') => p.i += 1,
                Some(_) => {
                    p.skip_past_semicolon();
                    continue;
                }
            }
            p.skip_ws();
            let param = p.token().to_ascii_lowercase();
            p.skip_ws();
            if p.peek() != Some(b'=') {
                continue;
            }
            p.i += 1;
            p.skip_ws();
            let (value, quoted) = p.value();
            match param.as_slice() {
                b"name" => out.name = Some(plain_value(&value, quoted)),
                b"filename" => out.filename = Some(plain_value(&value, quoted)),
                b"name*" => name_ext = ext_value(&value),
                b"filename*" => filename_ext = ext_value(&value),
                _ => {}
            }
        }
        if name_ext.is_some() {
            out.name = name_ext;
        }
        if filename_ext.is_some() {
            out.filename = filename_ext;
        }
        out
    }
}

/// RFC 2616 `separators`: the characters a backslash may escape in a quoted string.
fn is_special(b: u8) -> bool {
    b"()<>@,;:\\\"/[]?={} \t".contains(&b)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    /// A token: up to whitespace, `;` or `=`.
    fn token(&mut self) -> Vec<u8> {
        let start = self.i;
        while let Some(b) = self.peek() {
            if matches!(b, b' ' | b'\t' | b';' | b'=') {
                break;
            }
            self.i += 1;
        }
        self.s[start..self.i].to_vec()
    }

    fn skip_past_semicolon(&mut self) {
        while let Some(b) = self.peek() {
            if b == b';' {
                return;
            }
            if b == b'"' {
                let _ = self.value();
            } else {
                self.i += 1;
            }
        }
    }

    /// A parameter value: a quoted string (unescaped; an unterminated one runs to the end) or
    /// an unquoted value up to the next `;`, trailing whitespace trimmed (older clients send
    /// file names with spaces unquoted). The flag says whether it was quoted.
    fn value(&mut self) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        if self.peek() == Some(b'"') {
            self.i += 1;
            while let Some(b) = self.peek() {
                self.i += 1;
                match b {
                    b'"' => break,
                    b'\\' if self.peek().is_some_and(is_special) => {
                        out.push(self.s[self.i]);
                        self.i += 1;
                    }
                    _ => out.push(b),
                }
            }
            return (out, true);
        }
        while let Some(b) = self.peek() {
            if b == b';' {
                break;
            }
            out.push(b);
            self.i += 1;
        }
        while out.last().is_some_and(|b| b.is_ascii_whitespace()) {
            out.pop();
        }
        (out, false)
    }
}

/// A `name`/`filename` value: in a quoted value, `%XX` escapes are decoded when the result is
/// UTF-8 (otherwise the value is kept as sent), then it is read as UTF-8 (invalid bytes
/// replaced).
fn plain_value(value: &[u8], quoted: bool) -> String {
    if quoted && let Some(decoded) = percent_decode(value).and_then(|b| String::from_utf8(b).ok()) {
        return decoded;
    }
    String::from_utf8_lossy(value).into_owned()
}

/// `%XX` escapes decoded; a `%` not followed by two hex digits is kept. `None` when there is
/// no escape at all.
fn percent_decode(value: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut escapes = 0;
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%'
            && let (Some(h), Some(l)) = (value.get(i + 1).and_then(|&b| hex(b)), value.get(i + 2).and_then(|&b| hex(b)))
        {
            out.push(h << 4 | l);
            escapes += 1;
            i += 3;
        } else {
            out.push(value[i]);
            i += 1;
        }
    }
    (escapes > 0).then_some(out)
}

/// An RFC 8187 ext-value, `charset'language'percent-encoded`, in UTF-8 or ISO-8859-1; `None`
/// for another charset or a malformed value (the plain parameter is used then).
fn ext_value(value: &[u8]) -> Option<String> {
    let mut parts = value.splitn(3, |&b| b == b'\'');
    let (charset, _language, encoded) = (parts.next()?, parts.next()?, parts.next()?);
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        if encoded[i] == b'%' {
            let hex = std::str::from_utf8(encoded.get(i + 1..i + 3)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            bytes.push(encoded[i]);
            i += 1;
        }
    }
    if charset.eq_ignore_ascii_case(b"utf-8") {
        String::from_utf8(bytes).ok()
    } else if charset.eq_ignore_ascii_case(b"iso-8859-1") {
        Some(bytes.into_iter().map(char::from).collect())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> (bool, Option<String>, Option<String>) {
        let d = Disposition::parse(s.as_bytes());
        (d.form_data, d.name, d.filename)
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn names_and_types_are_case_insensitive() {
        assert_eq!(parse(r#"form-data; name="image"; filename="a.png""#), (true, some("image"), some("a.png")));
        assert_eq!(parse(r#"Form-Data; Name="image"; FileName="A.PNG""#), (true, some("image"), some("A.PNG")));
        assert_eq!(parse(r#"FORM-DATA;NAME=image;FILENAME=b.jpg"#), (true, some("image"), some("b.jpg")));
        assert_eq!(
            parse(r#"form-data ; name = "image" ; filename = "c d.png" "#),
            (true, some("image"), some("c d.png"))
        );
        assert_eq!(parse(r#"attachment; name="image""#), (false, some("image"), None));
        assert_eq!(parse(""), (false, None, None));
    }

    #[test]
    fn quoted_values_and_encodings() {
        // A `name=` inside another parameter's quoted value is not the field name.
        assert_eq!(parse(r#"form-data; filename="x; name=y.png"; name="image""#).1, some("image"));
        assert_eq!(parse(r#"form-data; name="image"; filename="say \"hi\".png""#).2, some(r#"say "hi".png"#));
        assert_eq!(parse(r#"form-data; name="image"; filename="C:\photos\a.png""#).2, some(r"C:\photos\a.png"));
        assert_eq!(parse(r#"form-data; name="image"; filename="say %22hi%22.png""#).2, some(r#"say "hi".png"#));
        assert_eq!(parse("form-data; name=\"image\"; filename=\"Ünïcode ✓.png\"").2, some("Ünïcode ✓.png"));
        assert_eq!(
            parse("form-data; name=\"image\"; filename*=UTF-8''%C3%9Cn%C3%AFcode%20%E2%9C%93.png; filename=\"x.png\"")
                .2,
            some("Ünïcode ✓.png")
        );
        assert_eq!(parse("form-data; name=\"image\"; filename*=iso-8859-1'en'%FCber.png").2, some("über.png"));
        assert_eq!(parse("form-data; name=\"image\"; filename*=koi8-r''%C1.png; filename=a.png").2, some("a.png"));
        assert_eq!(parse("form-data; name=\"image\"; filename*=UTF-8''%C1%.png; filename=a.png").2, some("a.png"));
        assert_eq!(parse(r#"form-data; name="image"; filename="unterminated"#).2, some("unterminated"));
        // aiohttp's FormData percent-encodes the whole name; a lone or invalid `%` stays.
        assert_eq!(parse(r#"form-data; name="image"; filename="%C3%BCn%20b%22.png""#).2, some("ün b\".png"));
        assert_eq!(parse(r#"form-data; name="image"; filename="100%.png""#).2, some("100%.png"));
        assert_eq!(parse(r#"form-data; name="image"; filename="%ff%zz.png""#).2, some("%ff%zz.png"));
        assert_eq!(parse(r#"form-data; junk; name="image""#).1, some("image"));
    }
}

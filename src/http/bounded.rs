//! JSON a client shapes, parsed with every count checked before items are allocated.
//!
//! serde builds a `Vec` of whatever length the client sends, and a `serde_json::Value` of
//! whatever shape: a 32 MiB body of `"",` items becomes half a gigabyte of strings before any
//! handler can count them. The request types use these functions instead (`deserialize_with`),
//! so a list past [`MAX_LIST`] items stops parsing at the first item too many, nested arrays are
//! flattened while they are counted, and fields qscore does not read are skipped without being
//! built (`IgnoredAny`). The per-route limits (`--max-batch-images`) are checked afterwards on
//! lists that are already small.

use std::{fmt, marker::PhantomData};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};

/// Most items in any list a request carries. `--max-batch-images` may not exceed it.
pub const MAX_LIST: usize = 4096;

/// Longest client-chosen identifier (a JSON `id`, a multipart file name, a task id), in bytes.
/// Identifiers are echoed in answers and queued for the flagged webhook, so they are bounded.
pub const MAX_ID_BYTES: usize = 1024;

/// Refuses an identifier longer than [`MAX_ID_BYTES`].
pub fn check_id(what: impl FnOnce() -> String, id: &str) -> Result<(), crate::error::Error> {
    if id.len() > MAX_ID_BYTES {
        return Err(crate::error::Error::IdTooLong { what: what(), len: id.len(), limit: MAX_ID_BYTES });
    }
    Ok(())
}

fn too_many<E: de::Error>() -> E {
    E::custom(format_args!("a list has more than {MAX_LIST} items; split the request"))
}

/// How the overflow error of a list of images (or of tasks, or a tensor's elements: one per
/// image) begins, so [`refused`] can tell it from other parse errors.
const TOO_MANY_IMAGES: &str = "a request has more than";

fn too_many_images<E: de::Error>() -> E {
    E::custom(format_args!("{TOO_MANY_IMAGES} {MAX_LIST} images; split the request"))
}

/// The error for a request body serde could not read. A list of images past [`MAX_LIST`] items
/// ([`image_list`], a tensor's [`Leaves`]) means too many images for one request, so it is the
/// same 413 `too_many_images` with the route's `limit` that a shorter list past the limit gets,
/// telling the client to split; anything else, other lists past the cap included, is
/// `invalid`'s 400.
pub fn refused(
    e: serde_json::Error,
    limit: usize,
    invalid: impl FnOnce(serde_json::Error) -> crate::error::Error,
) -> crate::error::Error {
    if e.is_data() && e.to_string().starts_with(TOO_MANY_IMAGES) {
        crate::error::Error::TooManyImages { limit }
    } else {
        invalid(e)
    }
}

/// A list of at most [`MAX_LIST`] items; `images` says whether each item is one image, which
/// decides the overflow error.
struct ListVisitor<T> {
    items: PhantomData<T>,
    images: bool,
}

impl<'de, T: de::Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {MAX_LIST} items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while out.len() < MAX_LIST {
            match seq.next_element()? {
                Some(item) => out.push(item),
                None => return Ok(out),
            }
        }
        match seq.next_element::<IgnoredAny>()? {
            Some(_) if self.images => Err(too_many_images()),
            Some(_) => Err(too_many()),
            None => Ok(out),
        }
    }
}

/// A list of at most [`MAX_LIST`] items (`#[serde(deserialize_with = "bounded::list")]`).
pub fn list<'de, D: Deserializer<'de>, T: de::Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(ListVisitor { items: PhantomData, images: false })
}

/// A list of at most [`MAX_LIST`] items, each one image (or one task), whose overflow
/// [`refused`] answers as too many images.
pub fn image_list<'de, D: Deserializer<'de>, T: de::Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(ListVisitor { items: PhantomData, images: true })
}

/// An optional list of at most [`MAX_LIST`] items; with `#[serde(default)]`.
pub fn optional_list<'de, D: Deserializer<'de>, T: de::Deserialize<'de>>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    struct Opt<T>(PhantomData<T>);
    impl<'de, T: de::Deserialize<'de>> Visitor<'de> for Opt<T> {
        type Value = Option<Vec<T>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "null or a list of at most {MAX_LIST} items")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            list(d).map(Some)
        }
    }
    d.deserialize_option(Opt(PhantomData))
}

/// The leaves of a tensor's `data`, nested lists flattened in row-major order (a KServe
/// tensor of shape `[2, 1]` may arrive as `[["a"], ["b"]]`), at most [`MAX_LIST`] in all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Leaves {
    /// The string leaves, in order.
    pub strings: Vec<String>,
    /// The number leaves, in order.
    pub numbers: Vec<f64>,
    /// Leaves that were neither (booleans, null): counted, never kept, so the caller can say
    /// which datatype was expected after checking the tensor's declared one.
    pub others: usize,
}

/// One leaf as it is kept.
enum Leaf {
    String(String),
    Number(f64),
    Other,
}

impl Leaves {
    fn push(&mut self, leaf: Leaf) -> Result<(), String> {
        if self.strings.len() + self.numbers.len() + self.others == MAX_LIST {
            return Err(format!("{TOO_MANY_IMAGES} {MAX_LIST} images; split the request"));
        }
        match leaf {
            Leaf::String(s) => self.strings.push(s),
            Leaf::Number(v) => self.numbers.push(v),
            Leaf::Other => self.others += 1,
        }
        Ok(())
    }
}

/// A tensor's optional `data` as [`Leaves`]; with `#[serde(default)]`.
pub fn tensor_leaves<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Leaves>, D::Error> {
    struct Flat<'a>(&'a mut Leaves);
    impl<'de> DeserializeSeed<'de> for Flat<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Flat<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "values, or lists of values, at most {MAX_LIST} in all")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
            self.0.push(Leaf::String(s.to_owned())).map_err(E::custom)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            self.0.push(Leaf::Other).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
            self.0.push(Leaf::Number(v as f64)).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
            self.0.push(Leaf::Number(v as f64)).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
            self.0.push(Leaf::Number(v)).map_err(E::custom)
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            self.0.push(Leaf::Other).map_err(E::custom)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Flat(&mut *self.0))?.is_some() {}
            Ok(())
        }
    }
    struct Opt;
    impl<'de> Visitor<'de> for Opt {
        type Value = Option<Leaves>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "null or a list")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            let mut out = Leaves::default();
            d.deserialize_seq(Flat(&mut out))?;
            Ok(Some(out))
        }
    }
    d.deserialize_option(Opt)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Lists {
        #[serde(deserialize_with = "list")]
        items: Vec<u8>,
        #[serde(default, deserialize_with = "tensor_leaves")]
        data: Option<Leaves>,
    }

    #[test]
    fn lists_stop_at_the_first_item_too_many() {
        let ok: Lists = serde_json::from_str(r#"{"items": [1, 2], "data": [["a"], ["b", ["c"]]]}"#).unwrap();
        assert_eq!(ok.items, vec![1, 2]);
        assert_eq!(ok.data.unwrap().strings, vec!["a", "b", "c"]);
        let exactly = format!(r#"{{"items": [{}]}}"#, vec!["0"; MAX_LIST].join(","));
        assert_eq!(serde_json::from_str::<Lists>(&exactly).unwrap().items.len(), MAX_LIST);
        let over = format!(r#"{{"items": [{}]}}"#, vec!["0"; MAX_LIST + 1].join(","));
        assert!(serde_json::from_str::<Lists>(&over).unwrap_err().to_string().contains("more than 4096"));
        let strings = format!(r#"{{"items": [], "data": [{}]}}"#, vec!["[\"\"]"; MAX_LIST + 1].join(","));
        assert!(serde_json::from_str::<Lists>(&strings).unwrap_err().to_string().contains("more than 4096"));
        // A tensor's elements past the cap are too many images (413); any other list past it,
        // or any other fault, is the caller's 400.
        let bad = |e: serde_json::Error| crate::error::Error::BadRequest(e.to_string());
        let images = serde_json::from_str::<Lists>(&strings).unwrap_err();
        assert!(matches!(refused(images, 8, bad), crate::error::Error::TooManyImages { limit: 8 }));
        let items = serde_json::from_str::<Lists>(&over).unwrap_err();
        assert!(matches!(refused(items, 8, bad), crate::error::Error::BadRequest(_)));
        let other = serde_json::from_str::<Lists>(r#"{"items": ["x"]}"#).unwrap_err();
        assert!(matches!(refused(other, 8, bad), crate::error::Error::BadRequest(_)));
        let mixed = serde_json::from_str::<Lists>(r#"{"items": [], "data": [1, ["x", 0.25], true, null]}"#).unwrap();
        let mixed = mixed.data.unwrap();
        assert_eq!((mixed.strings, mixed.numbers, mixed.others), (vec!["x".to_string()], vec![1.0, 0.25], 2));
        assert!(serde_json::from_str::<Lists>(r#"{"items": [], "data": null}"#).unwrap().data.is_none());
    }
}

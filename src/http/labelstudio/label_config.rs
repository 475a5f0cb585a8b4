//! Which fields of a task's data hold its images: the variables that the project's label config
//! names in its `<Image>` tags (`<Image name="img" value="$photo"/>` reads `data.photo`;
//! `valueList="$pages"` reads every URL of the list `data.pages`), as Label Studio's ML backend
//! SDK reads them.
//!
//! The config is client bytes, so it is parsed within bounds: at most
//! [`MAX_LABEL_CONFIG_BYTES`], [`MAX_NODES`] nodes, [`MAX_DEPTH`] levels, and no DTD (so no
//! entity is ever declared or expanded).

use crate::error::Error;

/// Largest label config read, in bytes. Label Studio's own configs with hundreds of labels stay
/// far below it.
pub const MAX_LABEL_CONFIG_BYTES: usize = 256 * 1024;
/// Most XML nodes (elements, attributes' text, text) in a label config.
pub const MAX_NODES: u32 = 20_000;
/// Deepest element nesting in a label config.
pub const MAX_DEPTH: usize = 64;
/// Longest variable name kept.
const MAX_VARIABLE_BYTES: usize = 256;

/// One image field of the task data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageField {
    /// `value="$name"`: `data.name` is one image reference.
    One(String),
    /// `valueList="$name"`: `data.name` is a list of image references.
    List(String),
}

impl ImageField {
    /// The data key.
    pub fn key(&self) -> &str {
        match self {
            Self::One(k) | Self::List(k) => k,
        }
    }
}

/// The image fields of a label config, in document order, without repeats; empty when the config
/// has no `<Image>` tag reading task data.
pub fn image_fields(config: &str) -> Result<Vec<ImageField>, Error> {
    let bad = |why: String| Error::BadRequest(format!("label config: {why}"));
    if config.len() > MAX_LABEL_CONFIG_BYTES {
        return Err(bad(format!("{} bytes, more than the {MAX_LABEL_CONFIG_BYTES} qscore reads", config.len())));
    }
    let options = roxmltree::ParsingOptions { allow_dtd: false, nodes_limit: MAX_NODES, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(config, options).map_err(|e| {
        bad(match e {
            roxmltree::Error::DtdDetected => "a DOCTYPE is not allowed in a label config".to_owned(),
            e => format!("not XML: {e}"),
        })
    })?;
    let mut fields: Vec<ImageField> = Vec::new();
    for node in doc.root().descendants().filter(roxmltree::Node::is_element) {
        if node.ancestors().count() > MAX_DEPTH + 1 {
            return Err(bad(format!("elements nested deeper than {MAX_DEPTH} levels")));
        }
        if !node.tag_name().name().eq_ignore_ascii_case("image") {
            continue;
        }
        let attribute = |name: &str| node.attributes().find(|a| a.name().eq_ignore_ascii_case(name)).map(|a| a.value());
        let field = match (attribute("valueList"), attribute("value")) {
            (Some(list), _) => variable(list).map(ImageField::List),
            (None, Some(one)) => variable(one).map(ImageField::One),
            (None, None) => None,
        };
        if let Some(field) = field.filter(|f| !fields.contains(f)) {
            fields.push(field);
        }
    }
    Ok(fields)
}

/// `$name` → `name`; `None` for a literal URL, an empty or overlong name, or a name built in a
/// `<Repeater>` (`$images[{{idx}}].url`), which qscore does not expand.
fn variable(value: &str) -> Option<String> {
    let name = value.trim().strip_prefix('$')?;
    let plain = !name.is_empty()
        && name.len() <= MAX_VARIABLE_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    plain.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(k: &str) -> ImageField {
        ImageField::One(k.into())
    }

    #[test]
    fn the_image_tags_name_the_fields() {
        let config = r#"<View><Text name="cap" value="$caption"/><Image name="img" value="$photo"/>
            <Choices name="c" toName="img"><Choice value="cat"/></Choices></View>"#;
        assert_eq!(image_fields(config).unwrap(), [one("photo")]);
        // Several object tags, any case, a multi-image list, repeats once.
        let config = r#"<View><image name="a" value="$front"/><IMAGE name="b" VALUE="$back"/>
            <Image name="p" valueList="$pages"/><Image name="c" value="$front"/>
            <Image name="s" value="https://static.example/logo.png"/><Image name="r" value="$items[{{idx}}].url"/></View>"#;
        assert_eq!(image_fields(config).unwrap(), [one("front"), one("back"), ImageField::List("pages".into())]);
        assert_eq!(image_fields(r#"<View><Text name="t" value="$text"/></View>"#).unwrap(), []);
    }

    #[test]
    fn the_config_is_read_within_bounds() {
        for (config, why) in [
            ("<View><Image", "not XML"),
            (r#"<!DOCTYPE v [<!ENTITY a "aaaa">]><View><Image name="i" value="$a"/>&a;</View>"#, "DOCTYPE"),
            (&format!("{}{}", "<V>".repeat(100), "</V>".repeat(100)), "deeper"),
            (&format!("<View>{}</View>", " ".repeat(MAX_LABEL_CONFIG_BYTES)), "bytes"),
            (&format!("<View>{}</View>", "<a/>".repeat(MAX_NODES as usize)), "not XML"),
        ] {
            let e = image_fields(config).unwrap_err();
            assert!(matches!(e, Error::BadRequest(_)) && e.to_string().contains(why), "{why}: {e}");
        }
    }
}

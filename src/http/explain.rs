//! `POST /v1/explain`: one image in, a heatmap per feature out, as JSON or as a PNG overlay.
//!
//! The edge only translates: the query and the `Accept` header into an
//! [`ExplainRequest`] and an answer format, [`Engine::explain`](crate::engine::Engine::explain)'s
//! answer into JSON or into the PNG that [`crate::explain::overlay`] draws. The feature list is
//! parsed against the model's dimension and `--max-explain-features` before any work.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::{AppState, handlers::after_body, upload::Uploads};
use crate::{
    engine::explain::{ExplainRequest, Explanation},
    error::Error,
    explain::{FeatureChoice, Fill, overlay, parse_features},
};

/// `?model=&features=&patch=&stride=` of `/v1/explain`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter (`?feature=`) is a 400 naming it, never a silent default.
#[serde(deny_unknown_fields)]
pub struct ExplainQuery {
    /// Model to use; the server's default when absent.
    pub model: Option<String>,
    /// Which features to map: `discriminative` (default: the calibrated discriminative features
    /// that fired on this image, L ∩ D, strongest first), `active` (every highly activating
    /// feature, L), or distinct indices such as `3,17,42`; at most `--max-explain-features`
    /// (default 16) maps, the strongest kept.
    pub features: Option<String>,
    /// Side of the square occluding patch in the model's input pixels, from 1 to the input's
    /// shorter side [default: a seventh of it: 4 for 28x28 Fashion-MNIST, 32 for 224x224
    /// MobileNetV2].
    pub patch: Option<usize>,
    /// Step between patch positions in input pixels, from 1 to `patch`; also the heatmap's cell
    /// size [default: half the patch]. The plan must cost at most `--max-explain-passes`
    /// (default 1024) passes and its grid at most 4096 cells.
    pub stride: Option<usize>,
    /// What occluded patches are filled with: `mean` (default: the normalisation mean, 0 in the
    /// tensor) or `black` (for data on a black background, such as Fashion-MNIST, where a grey
    /// patch would draw a new shape).
    #[serde(default)]
    pub fill: Fill,
}

/// The overlay answered for `Accept: image/png`.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct PngImage(Vec<u8>);

/// What the answer is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Png,
}

/// The media types `/v1/explain` answers in, as named in a 406.
const ANSWERED: &str = "application/json or image/png";

/// The answer format `Accept` prefers: PNG only when it ranks `image/png` above JSON; JSON when
/// there is no header, a tie, or `*/*`; 406 when it allows neither. Each media range's quality
/// comes from the most specific range that matches (RFC 9110 §12.5.1); at most 64 ranges are
/// read, so a long header costs no more.
fn negotiate(headers: &HeaderMap) -> Result<Format, Error> {
    let mut lines = headers.get_all(header::ACCEPT).iter().peekable();
    if lines.peek().is_none() {
        return Ok(Format::Json);
    }
    // (specificity, quality) of the best-matching range for each type.
    type Best = Option<(u8, f32)>;
    let (mut png, mut json): (Best, Best) = (None, None);
    let ranges =
        lines.flat_map(|v| String::from_utf8_lossy(v.as_bytes()).split(',').map(str::to_owned).collect::<Vec<_>>());
    for range in ranges.take(64) {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .filter(|q| q.is_finite())
            .map_or(1.0, |q| q.clamp(0.0, 1.0));
        let specificity = |full: &str, family: &str| match media.as_str() {
            m if m == full => Some(2),
            m if m == family => Some(1),
            "*/*" => Some(0),
            _ => None,
        };
        for (slot, full, family) in
            [(&mut png, "image/png", "image/*"), (&mut json, "application/json", "application/*")]
        {
            if let Some(s) = specificity(full, family)
                && slot.is_none_or(|(best, _)| s > best)
            {
                *slot = Some((s, quality));
            }
        }
    }
    let (qp, qj) = (png.map_or(0.0, |p| p.1), json.map_or(0.0, |j| j.1));
    match (qp > 0.0, qj > 0.0) {
        (false, false) => Err(Error::NotAcceptable(ANSWERED)),
        (true, _) if qp > qj => Ok(Format::Png),
        _ => Ok(Format::Json),
    }
}

/// Explain one image: which input cells make its features fire.
///
/// Occlusion sensitivity: a square patch of the model's input tensor (after resize, crop and
/// normalisation) is set to 0, the normalisation mean, and run forward; a cell's value is the
/// mean drop of the feature over the patches that cover it. Costs one forward pass per patch
/// position (169 with the defaults) plus one, batched through the model's worker with every
/// other request's images. With `Accept: image/png` the answer is the heatmaps drawn over the
/// input, one panel per feature (header `qscore-explain-features` lists them in order).
#[utoipa::path(
    post, path = "/v1/explain", tag = "scoring", params(ExplainQuery),
    request_body(description = "One image: multipart field `image`, or the raw bytes with an image/* content type.",
        content((super::handlers::ImageUpload = "multipart/form-data"), ("image/*"))),
    responses(
        (status = 200, description = "One heatmap per feature over the model's input grid, with its summary",
            content((Explanation = "application/json"), (PngImage = "image/png"))),
        (status = 400, description = "Malformed request; `features`, `patch` or `stride` out of bounds; more than one image", body = super::error::ErrorBody),
        (status = 404, description = "Unknown model", body = super::error::ErrorBody),
        (status = 406, description = "`Accept` allows neither application/json nor image/png", body = super::error::ErrorBody),
        (status = 413, description = "Body, image or pixel count over the limit", body = super::error::ErrorBody),
        (status = 415, description = "Unsupported content type or image format", body = super::error::ErrorBody),
        (status = 422, description = "The image could not be decoded", body = super::error::ErrorBody),
        (status = 429, description = "At capacity; retry after the Retry-After header", body = super::error::ErrorBody),
        (status = 500, description = "Server fault", body = super::error::ErrorBody),
        (status = 503, description = "The explanation did not finish within --request-timeout-ms", body = super::error::ErrorBody),
    )
)]
pub async fn explain(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ExplainQuery>, QueryRejection>,
    Uploads { items: mut uploads, held: _held }: Uploads,
) -> Result<Response, Error> {
    let q = after_body(query)?;
    let format = negotiate(&headers)?;
    let model = state.engine.registry().get(q.model.as_deref())?;
    let limits = state.engine.explain;
    let features = match q.features.as_deref() {
        Some(text) => parse_features(text, model.manifest.output.dim, limits.max_features)?,
        None => FeatureChoice::Discriminative,
    };
    if uploads.len() != 1 {
        return Err(Error::BadRequest(format!(
            "this endpoint explains one image and got {}; send one `image` part or a raw image body",
            uploads.len()
        )));
    }
    let input = uploads.pop().ok_or(Error::MissingImage)?;
    let request = ExplainRequest { features, patch: q.patch, stride: q.stride, fill: q.fill };
    let explanation = state.engine.explain(&model, input, &request).await?;
    let mut response = match format {
        Format::Json => {
            // The answer grows with the client's choices (features x cells): held while built.
            let cells = explanation.grid.rows * explanation.grid.cols;
            let _answer_held = state.engine.budget.hold((explanation.features.len() * cells * 16 + 4096) as u64)?;
            Json(&explanation).into_response()
        }
        Format::Png => png(&state, explanation, &model.preprocess).await?,
    };
    response.headers_mut().insert(header::VARY, HeaderValue::from_static("accept"));
    Ok(response)
}

/// The overlay as a PNG answer, drawn on the blocking pool with its canvas held in the budget.
async fn png(
    state: &AppState,
    explanation: Explanation,
    preprocess: &crate::model::manifest::Preprocess,
) -> Result<Response, Error> {
    let plan = explanation.occlusion;
    let _canvas_held = state.engine.budget.hold(2 * overlay::canvas_bytes(&plan, explanation.features.len()))?;
    let (mean, std) = (preprocess.mean.clone(), preprocess.std.clone());
    let listed: Vec<String> = explanation.features.iter().map(|f| f.index.to_string()).collect();
    let bytes = tokio::task::spawn_blocking(move || {
        let maps: Vec<&[f32]> = explanation.features.iter().map(|f| f.heatmap.as_slice()).collect();
        let canvas = overlay::render(explanation.input.view(), &mean, &std, &plan, &maps);
        overlay::png(&canvas)
    })
    .await
    .map_err(|e| Error::Internal(format!("overlay task failed: {e}")))?
    .map_err(|e| Error::Internal(format!("PNG encoding failed: {e}")))?;
    let mut response = ([(header::CONTENT_TYPE, "image/png")], bytes).into_response();
    if let Ok(v) = HeaderValue::from_str(&listed.join(",")) {
        response.headers_mut().insert("qscore-explain-features", v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(values: &[&str]) -> Result<Format, Error> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        negotiate(&h)
    }

    #[test]
    fn accept_picks_png_only_when_preferred() {
        assert_eq!(accept(&[]).unwrap(), Format::Json);
        assert_eq!(accept(&["image/png"]).unwrap(), Format::Png);
        assert_eq!(accept(&["image/*"]).unwrap(), Format::Png);
        assert_eq!(accept(&["*/*"]).unwrap(), Format::Json);
        assert_eq!(accept(&["application/json"]).unwrap(), Format::Json);
        assert_eq!(accept(&["image/png, application/json"]).unwrap(), Format::Json);
        assert_eq!(accept(&["image/png, application/json;q=0.5"]).unwrap(), Format::Png);
        assert_eq!(accept(&["image/png;q=0.1", "*/*;q=0.2"]).unwrap(), Format::Json);
        assert_eq!(accept(&["text/html,application/xhtml+xml,image/webp,*/*;q=0.8"]).unwrap(), Format::Json);
        assert_eq!(accept(&["*/*, image/png;q=0"]).unwrap(), Format::Json);
        for refused in [&["text/html"][..], &["image/jpeg"], &["application/json;q=0"], &["*/*;q=0"], &[""]] {
            assert!(matches!(accept(refused), Err(Error::NotAcceptable(_))), "{refused:?}");
        }
    }
}

//! The files of one part of `qscore calibrate`'s split, one path a line, so that a script can
//! measure on exactly the images a calibration reported on (`models/recipes/int8_agreement.py`
//! scores the test part with an fp32 model and its int8 copy). The split is rebuilt with the
//! calibration's own code and checked against the `file_list_sha256` a calibration.json
//! recorded, so a list that is not that calibration's split is an error, not a quiet mismatch.
//!
//! cargo run --release --example calibration_split -- FIT HOLDOUT SEED PART [CALIBRATION_JSON]
//!
//! PART is `fit`, `select` or `test`; the fractions are `qscore calibrate`'s defaults (0.5).

use std::path::PathBuf;

use anyhow::{Context, bail};
use qscore::calibrate::dataset::{Dataset, Part, Split};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [fit, holdout, seed, part, rest @ ..] = args.as_slice() else {
        bail!("usage: calibration_split FIT HOLDOUT SEED fit|select|test [CALIBRATION_JSON]");
    };
    let part = match part.as_str() {
        "fit" => Part::Fit,
        "select" => Part::Select,
        "test" => Part::Test,
        other => bail!("PART must be fit, select or test, not {other}"),
    };
    let split = Split { fit_fraction: 0.5, select_fraction: 0.5, seed: seed.parse().context("SEED")? };
    let dataset = Dataset::from_folders(&PathBuf::from(fit), &PathBuf::from(holdout), split)?;
    if let Some(calibration) = rest.first() {
        let text = std::fs::read_to_string(calibration).with_context(|| format!("cannot read {calibration}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{calibration} is not JSON"))?;
        let recorded = json["data"]["file_list_sha256"].as_str().unwrap_or_default();
        let rebuilt = dataset.fingerprint();
        if recorded != rebuilt {
            bail!("{calibration} was calibrated on another split (file list {recorded}, rebuilt {rebuilt})");
        }
    }
    for image in dataset.images.iter().filter(|i| i.part == part) {
        println!("{}", image.path.display());
    }
    Ok(())
}

//! `qscore::image::prepare`: every image format qscore sniffs and decodes (JPEG, PNG, GIF, BMP,
//! WebP, TIFF), through the header limits, colour conversion, resize, crop and normalisation.
//!
//! Input: byte 0 picks the preprocessing (its lowest bit: ImageNet RGB 224x224 after a
//! shorter-side resize to 256, or greyscale 28x28, plain resize; its next bit: a large JPEG
//! decoded at a reduced scale by jpeg-decoder, `jpeg_dct_scaling`); the rest is the encoded
//! image.
//!
//! Properties: no panic, no allocation past libFuzzer's -malloc_limit_mb / -rss_limit_mb;
//! when `prepare` succeeds, `inspect` succeeds on the same bytes, its `peak_bytes` (what the
//! server reserves before decoding) is under 1 GiB, and the tensor has the model's shape and
//! finite values; and whenever `inspect` accepts the bytes, the most heap `prepare` held at
//! once (counted by a global allocator) is within `peak_bytes`, whether it succeeded or not.
#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        LazyLock,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use libfuzzer_sys::fuzz_target;
use qscore::{
    image::{ImageLimits, decode, inspect, prepare, preprocess},
    model::manifest::{Color, Preprocess},
};

static IMAGENET: LazyLock<Preprocess> = LazyLock::new(|| Preprocess {
    width: 224,
    height: 224,
    resize_shorter: Some(256),
    color: Color::Rgb,
    mean: vec![0.485, 0.456, 0.406],
    std: vec![0.229, 0.224, 0.225],
    jpeg_dct_scaling: false,
});

static GREY28: LazyLock<Preprocess> = LazyLock::new(|| Preprocess {
    width: 28,
    height: 28,
    resize_shorter: None,
    color: Color::Grey,
    mean: vec![0.5],
    std: vec![0.5],
    jpeg_dct_scaling: false,
});

/// Both again with a large JPEG decoded at a reduced scale (another decoder, jpeg-decoder).
static REDUCED: LazyLock<[Preprocess; 2]> = LazyLock::new(|| {
    [&*IMAGENET, &*GREY28].map(|p| Preprocess { jpeg_dct_scaling: true, ..p.clone() })
});

const GIB: u64 = 1 << 30;

/// `QSCORE_FUZZ_VERBOSE=1`: print each input's header, heap held and `peak_bytes` (to look into
/// a reproducer by hand, e.g. `fuzz/target/*/release/image FILE`).
static VERBOSE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("QSCORE_FUZZ_VERBOSE").is_some());

/// The system allocator, counting the bytes live now and the most live since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` and returns its result with the most heap it held at once.
fn measured<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let out = f();
    (out, (PEAK.load(Relaxed) - base) as u64)
}

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, bytes)) = data.split_first() else { return };
    let p: &Preprocess = match choice & 3 {
        0 => &IMAGENET,
        1 => &GREY28,
        n => &REDUCED[usize::from(n - 2)],
    };
    let limits = ImageLimits::DEFAULT;
    let (result, held) = measured(|| prepare(bytes, &limits, p));
    let header = match (inspect(bytes, &limits), &result) {
        (Ok(header), _) => header,
        (Err(_), Err(_)) => return,
        (Err(e), Ok(_)) => panic!("prepare succeeded but inspect refused the same bytes: {e}"),
    };
    let peak = header.peak_bytes(p);
    if *VERBOSE {
        let outcome = result.as_ref().map(|t| t.dim()).map_err(ToString::to_string);
        eprintln!("{header:?}, {} channel(s): held {held}, peak_bytes {peak}; {outcome:?}", p.channels());
    }
    if held > peak {
        // Which stage: decoding (to its output image), or preprocessing with that image held.
        let (image, in_decode) = measured(|| decode(bytes, &limits));
        let in_preprocess = image.as_ref().map(|img| measured(|| preprocess(img, p)).1);
        panic!(
            "prepare held {held} bytes at once, past peak_bytes {peak} ({header:?}, {} channel(s)): \
             decode held {in_decode}, then preprocess {in_preprocess:?} more",
            p.channels()
        );
    }
    let Ok(tensor) = result else { return };
    assert!(peak < GIB, "peak_bytes {peak} >= 1 GiB for a {}x{} image", header.width, header.height);
    assert_eq!(tensor.dim(), (p.channels(), p.height as usize, p.width as usize));
    assert!(tensor.iter().all(|v| v.is_finite()), "non-finite value in the tensor");
});

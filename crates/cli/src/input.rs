//! Input files to input tensors: `.npy` as they are, images through the
//! capsule's preprocessing recipe (capsule-v1 §4.2).

use std::path::Path;

use anyhow::{Context, bail};
use capsule_engine::{Tensor, ValueInfo};
use capsule_format::Preprocessing;
use image::imageops::FilterType;

/// Loads one input file as a batch (leading dimension) for `input`.
pub fn load(
    path: &Path,
    input: &ValueInfo,
    recipe: Option<&Preprocessing>,
) -> anyhow::Result<Tensor> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensor = match ext.as_str() {
        "npy" => capsule_engine::npy::read_npy(&bytes)
            .with_context(|| format!("{} is not a readable .npy tensor", path.display()))?,
        "png" | "jpg" | "jpeg" => {
            let Some(recipe) = recipe else {
                bail!(
                    "{}: this model has no image preprocessing; pass a .npy tensor of shape {} instead (or seal with --preset/--image-size)",
                    path.display(),
                    shape_text(&input.shape)
                );
            };
            image_tensor(&bytes, recipe)
                .with_context(|| format!("{} is not a readable image", path.display()))?
        }
        _ => bail!(
            "{}: unknown input type; pass .npy tensors or .png/.jpg images",
            path.display()
        ),
    };
    fit(tensor, input).with_context(|| format!("{} does not fit the model", path.display()))
}

/// Adds a missing batch dimension and checks the shape against the model's input.
fn fit(tensor: Tensor, input: &ValueInfo) -> anyhow::Result<Tensor> {
    let tensor = if tensor.shape().len() + 1 == input.shape.len() {
        let mut shape = vec![1];
        shape.extend_from_slice(tensor.shape());
        tensor.reshape(shape)?
    } else {
        tensor
    };
    let fits = tensor.shape().len() == input.shape.len()
        && tensor
            .shape()
            .iter()
            .zip(&input.shape)
            .all(|(got, want)| want.is_none_or(|w| w == *got));
    if !fits {
        bail!(
            "input '{}' needs shape {} but the file holds {:?}; pass a tensor of that shape",
            input.name,
            shape_text(&input.shape),
            tensor.shape()
        );
    }
    Ok(tensor)
}

/// `[N, 1, 28, 28]` with `N` for a dynamic dimension.
pub fn shape_text(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| "N".to_owned(), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Decodes and preprocesses an image into `[1, C, H, W]`.
fn image_tensor(bytes: &[u8], recipe: &Preprocessing) -> anyhow::Result<Tensor> {
    let decoded = image::load_from_memory(bytes)?;
    let [h, w] = recipe.size;
    let resized = match recipe.resize_shorter {
        Some(shorter) => {
            let (iw, ih) = (decoded.width().max(1), decoded.height().max(1));
            let scale = f64::from(shorter) / f64::from(iw.min(ih));
            let (nw, nh) = (
                ((f64::from(iw) * scale).round() as u32).max(w),
                ((f64::from(ih) * scale).round() as u32).max(h),
            );
            let big = decoded.resize_exact(nw, nh, FilterType::Triangle);
            big.crop_imm((nw - w) / 2, (nh - h) / 2, w, h)
        }
        None if (decoded.width(), decoded.height()) == (w, h) => decoded,
        None => decoded.resize_exact(w, h, FilterType::Triangle),
    };
    let c = usize::from(recipe.channels);
    let pixels: Vec<u8> = match c {
        1 => resized.to_luma8().into_raw(),
        3 => resized.to_rgb8().into_raw(),
        _ => bail!("the capsule's preprocessing asks for {c} channels; only 1 and 3 exist"),
    };
    let plane = (h * w) as usize;
    let mut data = vec![0f32; c * plane];
    for (i, px) in pixels.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            data[ch * plane + i] = (f32::from(v) * recipe.scale - recipe.mean[ch]) / recipe.std[ch];
        }
    }
    Ok(Tensor::new(vec![1, c, h as usize, w as usize], data)?)
}

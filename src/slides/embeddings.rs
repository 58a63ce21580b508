//! Precomputed tile embeddings: one slide's tiles as a bag of `[N, D]` vectors (from CLAM,
//! Slideflow, TRIDENT, a foundation-model encoder …), uploaded as a safetensors file instead of
//! the slide. The file holds:
//!
//! - `embeddings`: float32 (or float64, narrowed) `[N, D]`, one row per tile;
//! - `coords` (optional): `[N, 2]` integers or floats, each tile's top-left corner in level-0
//!   pixels, so attention can be pointed back at the slide;
//! - optional string metadata (`__metadata__`), kept as it is (e.g. `encoder`, `mpp`).
//!
//! Any other tensor is refused rather than ignored, and so is a value that is not a finite number.

use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;

/// Most tiles one bag may have (a 100 000 × 100 000 slide at 20× has about 40 000 tiles of 256).
pub const MAX_TILES: usize = 1_000_000;

/// One bag of tile embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct Bag {
    pub tiles: usize,
    pub dim: usize,
    /// Row-major `[tiles, dim]`.
    pub values: Vec<f32>,
    /// Level-0 (x, y) of each tile, when the file has them.
    pub coords: Option<Vec<[f64; 2]>>,
    pub metadata: BTreeMap<String, String>,
}

/// Reads a safetensors file of tile embeddings; the error says what is wrong, for people.
pub fn parse(bytes: &[u8]) -> Result<Bag, String> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a safetensors file of tile embeddings: {e}"))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("the safetensors header cannot be read: {e}"))?;
    let mut names = file.names();
    names.sort_unstable();
    if let Some(other) = names
        .iter()
        .find(|n| !matches!(**n, "embeddings" | "coords"))
    {
        return Err(format!(
            "tensor {other:?} is not read: the file holds `embeddings` [N, D] and optionally `coords` [N, 2]"
        ));
    }
    let embeddings = file
        .tensor("embeddings")
        .map_err(|_| "the file has no `embeddings` tensor ([N, D] float32)".to_owned())?;
    let &[tiles, dim] = embeddings.shape() else {
        return Err(format!(
            "`embeddings` has shape {:?}; it must be [N, D]: one row per tile",
            embeddings.shape()
        ));
    };
    if tiles == 0 || dim == 0 {
        return Err("`embeddings` is empty".into());
    }
    if tiles > MAX_TILES {
        return Err(format!(
            "`embeddings` has {tiles} tiles; at most {MAX_TILES} are read"
        ));
    }
    let values: Vec<f32> = match embeddings.dtype() {
        Dtype::F32 => embeddings
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => embeddings
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        other => {
            return Err(format!(
                "`embeddings` is {other:?}; send float32 (or float64)"
            ));
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "`embeddings` row {} holds a value that is not a finite number",
            i / dim
        ));
    }
    let coords = match file.tensor("coords") {
        Err(_) => None,
        Ok(view) => {
            if view.shape() != [tiles, 2] {
                return Err(format!(
                    "`coords` has shape {:?}; it must be [{tiles}, 2]: (x, y) per tile",
                    view.shape()
                ));
            }
            let data = view.data();
            let numbers: Vec<f64> = match view.dtype() {
                Dtype::I32 => data
                    .chunks_exact(4)
                    .map(|b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect(),
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f64)
                    .collect(),
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect(),
                Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect(),
                other => {
                    return Err(format!(
                        "`coords` is {other:?}; send int32, int64, float32 or float64"
                    ));
                }
            };
            if numbers.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err("`coords` holds a negative or non-finite position".into());
            }
            Some(numbers.chunks_exact(2).map(|p| [p[0], p[1]]).collect())
        }
    };
    Ok(Bag {
        tiles,
        dim,
        values,
        coords,
        metadata: header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    })
}

/// A bag as a safetensors file: `embeddings` `[N, D]` float32 and `coords` `[N, 2]` int32
/// (level-0 corners), with string metadata.
pub fn to_safetensors(
    dim: usize,
    values: &[f32],
    xs: &[i32],
    ys: &[i32],
    metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let tiles = xs.len();
    if dim == 0 || values.len() != tiles * dim || ys.len() != tiles {
        return Err(format!(
            "{} values and {tiles} positions are not a bag of {dim}-wide embeddings",
            values.len()
        ));
    }
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let coords: Vec<u8> = xs
        .iter()
        .zip(ys)
        .flat_map(|(x, y)| [x.to_le_bytes(), y.to_le_bytes()])
        .flatten()
        .collect();
    let view = |dtype, shape, bytes| {
        safetensors::tensor::TensorView::new(dtype, shape, bytes).map_err(|e| e.to_string())
    };
    let tensors = vec![
        (
            "embeddings".to_owned(),
            view(Dtype::F32, vec![tiles, dim], &data)?,
        ),
        (
            "coords".to_owned(),
            view(Dtype::I32, vec![tiles, 2], &coords)?,
        ),
    ];
    let raw = safetensors::serialize(tensors, Some(metadata.into_iter().collect()))
        .map_err(|e| e.to_string())?;
    canonical(&raw)
}

/// The same file with its header's keys in sorted order: safetensors writes the metadata in hash
/// order, which differs between runs, and the same bag must be the same bytes (one digest).
fn canonical(raw: &[u8]) -> Result<Vec<u8>, String> {
    let broken = || "the safetensors header cannot be rewritten".to_owned();
    let prefix: [u8; 8] = raw
        .get(..8)
        .ok_or_else(broken)?
        .try_into()
        .map_err(|_| broken())?;
    let n = usize::try_from(u64::from_le_bytes(prefix)).map_err(|_| broken())?;
    let json = raw.get(8..8 + n).ok_or_else(broken)?;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if let Some(serde_json::Value::Object(metadata)) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> =
            std::mem::take(metadata).into_iter().collect();
        *metadata = sorted.into_iter().collect();
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // The data starts 8-byte aligned, as safetensors writes it.
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + raw.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&raw[8 + n..]);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use std::collections::HashMap;

    fn file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                (
                    (*name).to_owned(),
                    TensorView::new(*dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        let metadata = HashMap::from([("encoder".to_owned(), "test".to_owned())]);
        safetensors::serialize(views, Some(metadata)).unwrap()
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_bag_with_coordinates_is_read_and_bad_files_are_refused_with_the_reason() {
        let good = file(&[
            (
                "embeddings",
                Dtype::F32,
                vec![2, 3],
                f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ),
            (
                "coords",
                Dtype::I32,
                vec![2, 2],
                [0_i32, 0, 256, 512]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ]);
        let bag = parse(&good).unwrap();
        assert_eq!((bag.tiles, bag.dim), (2, 3));
        assert_eq!(bag.values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(bag.coords, Some(vec![[0.0, 0.0], [256.0, 512.0]]));
        assert_eq!(bag.metadata["encoder"], "test");
        // What onkos writes for an encoder's tiles reads back the same.
        let written = to_safetensors(
            3,
            &bag.values,
            &[0, 256],
            &[0, 512],
            BTreeMap::from([("encoder".to_owned(), "test".to_owned())]),
        )
        .unwrap();
        assert_eq!(parse(&written).unwrap(), bag);
        // Whatever order the metadata comes in, the same bag is the same bytes.
        let many = |order: &[usize]| {
            let keys = ["a", "b", "c", "d", "e", "f"];
            let metadata = order
                .iter()
                .map(|&i| (keys[i].to_owned(), i.to_string()))
                .collect();
            to_safetensors(3, &bag.values, &[0, 256], &[0, 512], metadata).unwrap()
        };
        assert_eq!(many(&[0, 1, 2, 3, 4, 5]), many(&[5, 3, 1, 0, 2, 4]));

        let refused = |bytes: Vec<u8>, words: &str| {
            let e = parse(&bytes).unwrap_err();
            assert!(e.contains(words), "{e}");
        };
        refused(b"not safetensors".to_vec(), "not a safetensors file");
        refused(
            file(&[("features", Dtype::F32, vec![1, 1], f32s(&[1.0]))]),
            "\"features\" is not read",
        );
        refused(
            file(&[("embeddings", Dtype::F32, vec![3], f32s(&[1.0, 2.0, 3.0]))]),
            "must be [N, D]",
        );
        refused(
            file(&[("embeddings", Dtype::F32, vec![2, 1], f32s(&[1.0, f32::NAN]))]),
            "row 1",
        );
        refused(
            file(&[("embeddings", Dtype::U8, vec![1, 2], vec![1, 2])]),
            "send float32",
        );
        refused(
            file(&[
                ("embeddings", Dtype::F32, vec![2, 1], f32s(&[1.0, 2.0])),
                ("coords", Dtype::F32, vec![1, 2], f32s(&[0.0, 0.0])),
            ]),
            "must be [2, 2]",
        );
    }
}

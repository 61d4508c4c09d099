//! The aspect-ratio bucket table (docs/architecture.md §2 "Bucket generation"), as NovelAI's
//! `bucketmanager.py` builds it.
//!
//! For `w = min_dim, min_dim + step, …` while `w <= max_dim` and `w * min_dim <= max_area`, take
//! the largest `h = min_dim + k * step` with `h <= max_dim` and `w * h <= max_area`; repeat with
//! width and height swapped; add `base_res`; remove duplicates; sort by width ascending, then
//! height descending. A bucket's id is its index in that order. The defaults give 19 buckets from
//! 256x1024 to 1024x256, with 512x512 at id 8.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, CommonError};

/// The parameters of the bucket table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BucketParams {
    /// The largest pixel area of a bucket.
    pub max_area: u64,
    /// The smallest side of a bucket.
    pub min_dim: u32,
    /// The largest side of a bucket.
    pub max_dim: u32,
    /// The side length increment.
    pub step: u32,
    /// The resolution of catch-all batches, always a bucket itself.
    pub base_res: [u32; 2],
}

impl Default for BucketParams {
    fn default() -> Self {
        Self {
            max_area: 512 * 768,
            min_dim: 256,
            max_dim: 1024,
            step: 64,
            base_res: [512, 512],
        }
    }
}

impl BucketParams {
    /// Refuses parameters that cannot make a table, naming the field.
    pub fn validate(&self) -> Result<(), CommonError> {
        if self.step == 0 {
            return Err(invalid("step", "must be positive"));
        }
        if self.min_dim == 0 {
            return Err(invalid("min_dim", "must be positive"));
        }
        if self.min_dim > self.max_dim {
            return Err(invalid(
                "min_dim",
                format!(
                    "min_dim {} is larger than max_dim {}",
                    self.min_dim, self.max_dim
                ),
            ));
        }
        // Bucket ids are u16 and every candidate width (and height) gives one bucket: bound
        // the sweep before it runs, so absurd flags are an error rather than an exhausted heap.
        let candidate_sides = u64::from(self.max_dim - self.min_dim) / u64::from(self.step) + 1;
        if candidate_sides > MAX_CANDIDATE_SIDES {
            return Err(invalid(
                "step",
                format!(
                    "step {} over {}..={} gives {candidate_sides} candidate sides; at most \
                     {MAX_CANDIDATE_SIDES} are allowed (raise step or narrow min_dim..max_dim)",
                    self.step, self.min_dim, self.max_dim
                ),
            ));
        }
        let smallest_area = u64::from(self.min_dim) * u64::from(self.min_dim);
        if smallest_area > self.max_area {
            return Err(invalid(
                "max_area",
                format!(
                    "max_area {} is smaller than the smallest bucket {}x{} ({smallest_area} pixels)",
                    self.max_area, self.min_dim, self.min_dim
                ),
            ));
        }
        let [base_width, base_height] = self.base_res;
        let in_bounds = |side: u32| (self.min_dim..=self.max_dim).contains(&side);
        if !in_bounds(base_width) || !in_bounds(base_height) {
            return Err(invalid(
                "base_res",
                format!(
                    "{base_width}x{base_height} is outside the bucket bounds {}..={}",
                    self.min_dim, self.max_dim
                ),
            ));
        }
        Ok(())
    }
}

/// The most candidate widths (and heights) a bucket sweep may visit: twice this plus base_res
/// stays below the u16 id space.
pub const MAX_CANDIDATE_SIDES: u64 = 16_384;

/// One bucket resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bucket {
    pub width: u32,
    pub height: u32,
}

impl Bucket {
    /// width / height in f64.
    pub fn aspect(&self) -> f64 {
        f64::from(self.width) / f64::from(self.height)
    }
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}x{}", self.width, self.height)
    }
}

/// The bucket table: ids are indices into [`BucketTable::buckets`].
#[derive(Debug, Clone, PartialEq)]
pub struct BucketTable {
    params: BucketParams,
    buckets: Vec<Bucket>,
    aspects: Vec<f64>,
    base_id: u16,
}

impl BucketTable {
    /// Generates the table from validated parameters.
    pub fn new(params: BucketParams) -> Result<Self, CommonError> {
        params.validate()?;
        let mut buckets = sweep(&params, false);
        buckets.extend(sweep(&params, true));
        buckets.push(Bucket {
            width: params.base_res[0],
            height: params.base_res[1],
        });
        buckets.sort_by(|a, b| a.width.cmp(&b.width).then(b.height.cmp(&a.height)));
        buckets.dedup();
        if buckets.len() > usize::from(u16::MAX) {
            return Err(invalid(
                "step",
                format!(
                    "{} buckets exceed the supported maximum of {}",
                    buckets.len(),
                    u16::MAX
                ),
            ));
        }
        let base = Bucket {
            width: params.base_res[0],
            height: params.base_res[1],
        };
        let base_id = buckets
            .iter()
            .position(|bucket| *bucket == base)
            .expect("base_res was inserted into the table") as u16;
        let aspects = buckets.iter().map(Bucket::aspect).collect();
        Ok(Self {
            params,
            buckets,
            aspects,
            base_id,
        })
    }

    pub fn params(&self) -> &BucketParams {
        &self.params
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// The aspect ratio of every bucket, by id.
    pub fn aspects(&self) -> &[f64] {
        &self.aspects
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn get(&self, id: u16) -> Option<Bucket> {
        self.buckets.get(usize::from(id)).copied()
    }

    /// The id of `base_res`, the catch-all resolution.
    pub fn base_id(&self) -> u16 {
        self.base_id
    }

    /// The catch-all resolution.
    pub fn base(&self) -> Bucket {
        self.buckets[usize::from(self.base_id)]
    }
}

/// One pass of the generation loop; `swapped` exchanges width and height.
fn sweep(params: &BucketParams, swapped: bool) -> Vec<Bucket> {
    let mut buckets = Vec::new();
    let min_dim = u64::from(params.min_dim);
    let max_dim = u64::from(params.max_dim);
    let step = u64::from(params.step);
    let mut first = min_dim;
    while first <= max_dim && first * min_dim <= params.max_area {
        let limit = max_dim.min(params.max_area / first);
        let second = min_dim + (limit - min_dim) / step * step;
        let (width, height) = if swapped {
            (second, first)
        } else {
            (first, second)
        };
        buckets.push(Bucket {
            width: width as u32,
            height: height as u32,
        });
        first += step;
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_sweep_is_refused_before_it_runs() {
        let params = BucketParams {
            max_area: u64::MAX / 4,
            min_dim: 1,
            max_dim: 4_000_000_000,
            step: 1,
            base_res: [512, 512],
        };
        let error = BucketTable::new(params).unwrap_err().to_string();
        assert!(
            error.contains("step") && error.contains("candidate sides"),
            "{error}"
        );
    }

    #[test]
    fn default_table_matches_novelai() {
        let table = BucketTable::new(BucketParams::default()).unwrap();
        let sizes: Vec<(u32, u32)> = table
            .buckets()
            .iter()
            .map(|b| (b.width, b.height))
            .collect();
        assert_eq!(
            sizes,
            vec![
                (256, 1024),
                (320, 1024),
                (384, 1024),
                (384, 960),
                (384, 896),
                (448, 832),
                (512, 768),
                (512, 704),
                (512, 512),
                (576, 640),
                (640, 576),
                (704, 512),
                (768, 512),
                (832, 448),
                (896, 384),
                (960, 384),
                (1024, 384),
                (1024, 320),
                (1024, 256),
            ]
        );
        assert_eq!(table.base_id(), 8);
        assert_eq!(
            table.base(),
            Bucket {
                width: 512,
                height: 512
            }
        );
    }

    #[test]
    fn invalid_parameters_name_their_field() {
        let cases = [
            (
                BucketParams {
                    step: 0,
                    ..Default::default()
                },
                "step",
            ),
            (
                BucketParams {
                    min_dim: 0,
                    ..Default::default()
                },
                "min_dim",
            ),
            (
                BucketParams {
                    min_dim: 2048,
                    max_dim: 1024,
                    ..Default::default()
                },
                "min_dim",
            ),
            (
                BucketParams {
                    max_area: 1000,
                    ..Default::default()
                },
                "max_area",
            ),
            (
                BucketParams {
                    base_res: [128, 512],
                    ..Default::default()
                },
                "base_res",
            ),
            (
                BucketParams {
                    base_res: [512, 2048],
                    ..Default::default()
                },
                "base_res",
            ),
        ];
        for (params, field) in cases {
            match BucketTable::new(params).unwrap_err() {
                CommonError::InvalidParameter { field: got, .. } => assert_eq!(got, field),
                other => panic!("unexpected error {other}"),
            }
        }
    }

    #[test]
    fn base_res_off_the_grid_is_added_as_its_own_bucket() {
        let params = BucketParams {
            base_res: [500, 500],
            ..Default::default()
        };
        let table = BucketTable::new(params).unwrap();
        // The sweeps give 18 buckets; 512x512 exists only because it is the default base_res.
        assert_eq!(table.len(), 19);
        assert_eq!(
            table.base(),
            Bucket {
                width: 500,
                height: 500
            }
        );
        assert_eq!(table.base_id(), 6, "500 sorts before the 512-wide buckets");
        assert!(!table.buckets().contains(&Bucket {
            width: 512,
            height: 512
        }));
    }
}

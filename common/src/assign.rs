//! Assigning images to buckets (docs/architecture.md §2 "Assignment").
//!
//! An image of aspect `a = width / height` (f64) goes to the bucket minimising `|a_b - a|`
//! (the default `linear` metric) or `|ln a_b - ln a|` (`log`); an exact tie goes to the lowest
//! id. It is pruned when the *linear* error of that bucket is `>= max_ar_error`. Pruned images
//! are counted and listed, never dropped silently.

use serde::{Deserialize, Serialize};

use crate::buckets::{Bucket, BucketTable};
use crate::error::{invalid, CommonError};

/// How the distance between two aspect ratios is measured when choosing a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AspectMetric {
    /// `|a_b - a|`, NovelAI's metric.
    #[default]
    Linear,
    /// `|ln a_b - ln a|`, symmetric between portrait and landscape.
    Log,
}

impl std::str::FromStr for AspectMetric {
    type Err = CommonError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "linear" => Ok(Self::Linear),
            "log" => Ok(Self::Log),
            other => Err(invalid(
                "aspect_metric",
                format!("unknown metric `{other}`, expected `linear` or `log`"),
            )),
        }
    }
}

/// The assignment parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssignParams {
    pub aspect_metric: AspectMetric,
    /// Images whose linear aspect error is at least this are pruned.
    pub max_ar_error: f64,
}

impl Default for AssignParams {
    fn default() -> Self {
        Self {
            aspect_metric: AspectMetric::Linear,
            max_ar_error: 4.0,
        }
    }
}

impl AssignParams {
    pub fn validate(&self) -> Result<(), CommonError> {
        if self.max_ar_error.is_nan() || self.max_ar_error <= 0.0 {
            return Err(invalid(
                "max_ar_error",
                format!("must be a positive number, got {}", self.max_ar_error),
            ));
        }
        Ok(())
    }
}

/// Where one image goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    /// The best bucket, given even when the image is pruned.
    pub bucket_id: u16,
    pub bucket: Bucket,
    /// `|a_b - a|` for the chosen bucket, whatever the metric.
    pub ar_error: f64,
    /// False when the image is pruned.
    pub kept: bool,
}

/// Buckets a table and assignment parameters, validated together.
#[derive(Debug, Clone)]
pub struct Assigner {
    table: BucketTable,
    params: AssignParams,
    log_aspects: Vec<f64>,
}

impl Assigner {
    pub fn new(table: BucketTable, params: AssignParams) -> Result<Self, CommonError> {
        params.validate()?;
        let log_aspects = table.aspects().iter().map(|aspect| aspect.ln()).collect();
        Ok(Self {
            table,
            params,
            log_aspects,
        })
    }

    pub fn table(&self) -> &BucketTable {
        &self.table
    }

    pub fn params(&self) -> &AssignParams {
        &self.params
    }

    /// Assigns one image. Zero sizes are refused with the item id.
    pub fn assign(&self, item_id: u64, width: u32, height: u32) -> Result<Assignment, CommonError> {
        if width == 0 || height == 0 {
            return Err(CommonError::InvalidImageSize {
                item_id,
                width,
                height,
            });
        }
        let aspect = f64::from(width) / f64::from(height);
        let bucket_id = match self.params.aspect_metric {
            AspectMetric::Linear => argmin_distance(self.table.aspects(), aspect),
            AspectMetric::Log => argmin_distance(&self.log_aspects, aspect.ln()),
        };
        let ar_error = (self.table.aspects()[bucket_id] - aspect).abs();
        Ok(Assignment {
            bucket_id: bucket_id as u16,
            bucket: self.table.buckets()[bucket_id],
            ar_error,
            kept: ar_error < self.params.max_ar_error,
        })
    }
}

/// The index of the value closest to `target`; the first one wins an exact tie.
fn argmin_distance(values: &[f64], target: f64) -> usize {
    let mut best_index = 0;
    let mut best_distance = f64::INFINITY;
    for (index, value) in values.iter().enumerate() {
        let distance = (value - target).abs();
        if distance < best_distance {
            best_index = index;
            best_distance = distance;
        }
    }
    best_index
}

/// The kept items of a dataset, bucketed, as parallel arrays indexed by *position*
/// (`0..len()`). Plans and samplers work on positions; ids are looked up at the end.
/// Ten bytes per item: the 64-bit id and the 16-bit bucket id.
#[derive(Debug, Clone, Default)]
pub struct BucketedItems {
    ids: Vec<u64>,
    buckets: Vec<u16>,
    pruned_ids: Vec<u64>,
    bucket_counts: Vec<u64>,
    aspect_error_sum: f64,
}

impl BucketedItems {
    /// An empty set for a table of `bucket_count` buckets, with room for `capacity` items.
    pub fn with_capacity(bucket_count: usize, capacity: usize) -> Self {
        Self {
            ids: Vec::with_capacity(capacity),
            buckets: Vec::with_capacity(capacity),
            pruned_ids: Vec::new(),
            bucket_counts: vec![0; bucket_count],
            aspect_error_sum: 0.0,
        }
    }

    /// Assigns and records every `(id, width, height)`.
    pub fn assign_all(
        assigner: &Assigner,
        sizes: impl IntoIterator<Item = (u64, u32, u32)>,
    ) -> Result<Self, CommonError> {
        let sizes = sizes.into_iter();
        let mut items = Self::with_capacity(assigner.table().len(), sizes.size_hint().0);
        for (id, width, height) in sizes {
            items.push(id, &assigner.assign(id, width, height)?)?;
        }
        Ok(items)
    }

    /// Items whose buckets are already known (a shard streamed by the coordinator), in order.
    pub fn from_assigned(
        bucket_count: usize,
        assigned: impl IntoIterator<Item = (u64, u16)>,
    ) -> Result<Self, CommonError> {
        let assigned = assigned.into_iter();
        let mut items = Self::with_capacity(bucket_count, assigned.size_hint().0);
        for (id, bucket) in assigned {
            if usize::from(bucket) >= bucket_count {
                return Err(invalid(
                    "bucket",
                    format!("item {id} has bucket {bucket} but the table has {bucket_count}"),
                ));
            }
            if items.ids.len() as u64 >= u64::from(u32::MAX) {
                return Err(CommonError::TooManyItems {
                    count: items.ids.len() as u64 + 1,
                    max: u64::from(u32::MAX),
                });
            }
            items.ids.push(id);
            items.buckets.push(bucket);
            items.bucket_counts[usize::from(bucket)] += 1;
        }
        Ok(items)
    }

    /// Records one assigned item (kept or pruned).
    pub fn push(&mut self, id: u64, assignment: &Assignment) -> Result<(), CommonError> {
        if !assignment.kept {
            self.pruned_ids.push(id);
            return Ok(());
        }
        if self.ids.len() as u64 >= u64::from(u32::MAX) {
            return Err(CommonError::TooManyItems {
                count: self.ids.len() as u64 + 1,
                max: u64::from(u32::MAX),
            });
        }
        self.ids.push(id);
        self.buckets.push(assignment.bucket_id);
        self.bucket_counts[usize::from(assignment.bucket_id)] += 1;
        self.aspect_error_sum += assignment.ar_error;
        Ok(())
    }

    /// The number of kept items.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Item ids by position.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// Bucket ids by position.
    pub fn buckets(&self) -> &[u16] {
        &self.buckets
    }

    pub fn id(&self, position: u32) -> u64 {
        self.ids[position as usize]
    }

    pub fn bucket(&self, position: u32) -> u16 {
        self.buckets[position as usize]
    }

    /// Ids of the pruned images, in input order.
    pub fn pruned_ids(&self) -> &[u64] {
        &self.pruned_ids
    }

    /// Kept items per bucket id.
    pub fn bucket_counts(&self) -> &[u64] {
        &self.bucket_counts
    }

    /// The mean linear aspect error of the kept items (0 when none are kept).
    pub fn mean_aspect_error(&self) -> f64 {
        if self.ids.is_empty() {
            return 0.0;
        }
        self.aspect_error_sum / self.ids.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buckets::BucketParams;

    fn default_assigner(metric: AspectMetric) -> Assigner {
        let table = BucketTable::new(BucketParams::default()).unwrap();
        Assigner::new(
            table,
            AssignParams {
                aspect_metric: metric,
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn hand_worked_assignments() {
        let assigner = default_assigner(AspectMetric::Linear);
        // Square (1x1 too) goes to 512x512 with no error.
        for (width, height) in [(1, 1), (512, 512), (4000, 4000)] {
            let assignment = assigner.assign(0, width, height).unwrap();
            assert_eq!(assignment.bucket_id, 8);
            assert_eq!(assignment.ar_error, 0.0);
            assert!(assignment.kept);
        }
        // 2:3 portrait is exactly 512x768 (id 6).
        let portrait = assigner.assign(0, 1000, 1500).unwrap();
        assert_eq!((portrait.bucket_id, portrait.ar_error), (6, 0.0));
        // 16:9 (1.777…) lies between 896x384 (2.333) and 832x448 (1.857) / 768x512 (1.5):
        // nearest is 832x448.
        let wide = assigner.assign(0, 1920, 1080).unwrap();
        assert_eq!(
            wide.bucket,
            Bucket {
                width: 832,
                height: 448
            }
        );
        assert!((wide.ar_error - (832.0 / 448.0 - 1920.0 / 1080.0)).abs() < 1e-12);
    }

    #[test]
    fn panoramas_of_eight_to_one_are_pruned_but_report_their_bucket() {
        let assigner = default_assigner(AspectMetric::Linear);
        let panorama = assigner.assign(0, 8192, 1024).unwrap();
        assert_eq!(
            panorama.bucket,
            Bucket {
                width: 1024,
                height: 256
            }
        );
        assert_eq!(panorama.ar_error, 4.0);
        assert!(!panorama.kept, "error == max_ar_error is pruned");
        let slightly_less = assigner.assign(0, 7999, 1000).unwrap();
        assert!(slightly_less.kept);
    }

    #[test]
    fn exact_ties_go_to_the_lowest_id() {
        // Two buckets 1.0 and 2.0 apart from 1.5: build a table with 512x512 and 1024x512 only
        // reachable as neighbours: aspects 1.0 (id 1) and 2.0 (id 2) with min_dim 512.
        let params = BucketParams {
            max_area: 1024 * 512,
            min_dim: 512,
            max_dim: 1024,
            step: 512,
            base_res: [512, 512],
        };
        let table = BucketTable::new(params).unwrap();
        let sizes: Vec<_> = table
            .buckets()
            .iter()
            .map(|b| (b.width, b.height))
            .collect();
        assert_eq!(sizes, vec![(512, 1024), (512, 512), (1024, 512)]);
        let assigner = Assigner::new(table, AssignParams::default()).unwrap();
        // 3:2 = 1.5 is 0.5 from both 1.0 (id 1) and 2.0 (id 2).
        let tie = assigner.assign(0, 3, 2).unwrap();
        assert_eq!(tie.bucket_id, 1);
        assert_eq!(tie.ar_error, 0.5);
    }

    #[test]
    fn log_metric_picks_differently_but_prunes_on_linear_error() {
        let linear = default_assigner(AspectMetric::Linear);
        let log = default_assigner(AspectMetric::Log);
        // 1024x320 is exactly 3.2: both metrics agree on it.
        assert_eq!(linear.assign(0, 3200, 1000).unwrap().bucket_id, 17);
        assert_eq!(log.assign(0, 3200, 1000).unwrap().bucket_id, 17);
        // a = 3.5: linear 0.3 (3.2) vs 0.5 (4.0) -> 17; log 0.0896 vs 0.1335 -> 17.
        assert_eq!(linear.assign(0, 3500, 1000).unwrap().bucket_id, 17);
        // a = 3.58: linear 0.38 vs 0.42 -> 17; log |ln 3.2 - ln 3.58| = 0.1122 vs
        // |ln 4 - ln 3.58| = 0.1109 -> 18 (1024x256).
        assert_eq!(linear.assign(0, 3580, 1000).unwrap().bucket_id, 17);
        assert_eq!(log.assign(0, 3580, 1000).unwrap().bucket_id, 18);
        let pruned = log.assign(0, 9000, 1000).unwrap();
        assert_eq!(pruned.bucket_id, 18);
        assert!(!pruned.kept && (pruned.ar_error - 5.0).abs() < 1e-12);
    }

    #[test]
    fn bucketed_items_count_pruned_and_kept() {
        let assigner = default_assigner(AspectMetric::Linear);
        let items = BucketedItems::assign_all(
            &assigner,
            [
                (10, 512, 512),
                (11, 8192, 1024),
                (12, 1000, 1500),
                (13, 1, 1),
            ],
        )
        .unwrap();
        assert_eq!(items.ids(), &[10, 12, 13]);
        assert_eq!(items.buckets(), &[8, 6, 8]);
        assert_eq!(items.pruned_ids(), &[11]);
        assert_eq!(items.bucket_counts()[8], 2);
        assert_eq!(items.mean_aspect_error(), 0.0);
        let error = BucketedItems::assign_all(&assigner, [(99, 0, 5)]).unwrap_err();
        assert!(error.to_string().contains("item 99"));
    }

    #[test]
    fn invalid_max_ar_error_is_refused() {
        let table = BucketTable::new(BucketParams::default()).unwrap();
        for bad in [0.0, -1.0, f64::NAN] {
            let params = AssignParams {
                max_ar_error: bad,
                ..Default::default()
            };
            assert!(Assigner::new(table.clone(), params).is_err());
        }
    }
}

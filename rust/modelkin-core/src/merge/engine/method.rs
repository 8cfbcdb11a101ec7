//! What a merge method is: the vocabulary of the method table (its row type, parameters, ranges);
//! the rows themselves, and the lookups the engine makes in them, are in `table.rs`. The Python
//! layer reads the table (through `modelkin._core.methods()`) to validate recipes, fill defaults
//! and print `modelkin methods`; the engine reads the same rows to pick its statistics passes and
//! its combination. Adding a method is one module with its arithmetic (in `merge/methods/`) plus
//! one row in `table.rs`.

use serde::Deserialize;

/// A merge method, named as in mergekit's YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Weighted average of the models (a model soup).
    Linear,
    /// Base plus the weighted sum of task vectors.
    TaskArithmetic,
    /// Task arithmetic with top-k magnitude pruning and sign election.
    Ties,
    /// Random (Bernoulli) pruning with L1 rescaling and sign election.
    DareTies,
    /// Random (Bernoulli) pruning with L1 rescaling.
    DareLinear,
    /// Drops the largest `gamma` and the smallest entries of each task vector.
    Breadcrumbs,
    /// Breadcrumbs with sign election.
    BreadcrumbsTies,
    /// Spherical interpolation between the base (t = 0) and one other model.
    Slerp,
    /// Model Stock: interpolation towards the average by the task vectors' mean cosine.
    ModelStock,
    /// DELLA: magnitude-ranked random pruning per row, L1 rescale, sign election.
    Della,
    /// DELLA without sign election.
    DellaLinear,
    /// SCE: select high-variance entries, weight task vectors by their energy, sign election.
    Sce,
    /// Spherical interpolation of two models (or their task vectors), t from their weights.
    Nuslerp,
    /// Barycentric interpolation of several models (or task vectors) on the hypersphere.
    Multislerp,
    /// The Karcher (Riemannian) mean of the models' directions, scaled by their mean norm.
    Karcher,
    /// Copies one model's tensor, times its `scale` (mergekit's per-input parameter).
    Passthrough,
    /// Takes the other model's value where it is within `t` of the base's: weight = t/|a − b|.
    Nearswap,
    /// RAM: entries one model contributes kept whole, shared ones averaged over contributors.
    Ram,
    /// RAM+ (tensor-local): RAM with each model's unique entries scaled by its λ.
    RamplusTl,
    /// Arcee Fusion: the other model's changes where their softmax-KL importance is an outlier.
    ArceeFusion,
}

/// How a method prunes each task vector before combining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsification {
    /// Keep the top `density` fraction by magnitude (TIES).
    Magnitude,
    /// Keep each entry with probability `density` (DARE).
    Random,
    /// Drop the largest `gamma` and keep the next `density` fraction by magnitude (breadcrumbs).
    MagnitudeOutliers,
    /// Keep probabilities ranked by magnitude within each row (DELLA).
    DellaMagprune,
}

/// What a method does with `base_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// It needs one: task vectors are taken against it (or it is slerp's t = 0 end).
    Required,
    /// With one it works on task vectors, without one on the models themselves.
    Optional,
    /// It is averaged with the models, as one more input (karcher, as mergekit 0.1.5 does).
    AsInput,
    /// It is not read (linear and passthrough, as in mergekit).
    Ignored,
}

impl BaseUse {
    /// The name `modelkin methods` prints.
    pub fn name(self) -> &'static str {
        match self {
            BaseUse::Required => "required",
            BaseUse::Optional => "optional",
            BaseUse::AsInput => "input",
            BaseUse::Ignored => "ignored",
        }
    }
}

/// Where a parameter is read from. mergekit lets a global value stand for a per-model one (and
/// reads a per-model one where only a global one is declared), so this says where it is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One value for the merge (`parameters:` at the top), per tensor through filters and gradients.
    Global,
    /// One value per model (`models[i].parameters`), per tensor through filters and gradients.
    PerModel,
}

impl Scope {
    /// The name `modelkin methods` prints.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::PerModel => "per_model",
        }
    }
}

/// A parameter's default value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    /// The recipe must give it.
    Required,
    /// A number.
    Number(f64),
    /// A whole number.
    Integer(i64),
    /// A flag.
    Flag(bool),
}

/// The values a numeric parameter may take: `low ≤ v ≤ high`, either end open when asked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// Lowest value.
    pub low: f64,
    /// Highest value.
    pub high: f64,
    /// Whether `low` itself is excluded.
    pub low_open: bool,
    /// Whether `high` itself is excluded.
    pub high_open: bool,
}

impl Range {
    pub(super) const fn closed(low: f64, high: f64) -> Option<Range> {
        Some(Range { low, high, low_open: false, high_open: false })
    }

    pub(super) const fn above(low: f64) -> Option<Range> {
        Some(Range { low, high: f64::INFINITY, low_open: true, high_open: true })
    }

    /// Whether `value` lies in the range.
    pub fn contains(&self, value: f64) -> bool {
        let above = if self.low_open { value > self.low } else { value >= self.low };
        let below = if self.high_open { value < self.high } else { value <= self.high };
        above && below
    }

    /// The range in interval notation, for messages: `[0, 1]`, `(0, inf)`.
    pub fn text(&self) -> String {
        let number = |v: f64| if v.is_infinite() { "inf".to_string() } else { format!("{v}") };
        format!(
            "{}{}, {}{}",
            if self.low_open { "(" } else { "[" },
            number(self.low),
            number(self.high),
            if self.high_open { ")" } else { "]" }
        )
    }
}

/// One parameter of a method.
#[derive(Debug, Clone, Copy)]
pub struct Parameter {
    /// Its key in the recipe.
    pub name: &'static str,
    /// Where it is declared.
    pub scope: Scope,
    /// Its default.
    pub default: DefaultValue,
    /// The values it may take, if limited.
    pub range: Option<Range>,
    /// What it does, in one line.
    pub help: &'static str,
    /// Why it is accepted and has no effect, when mergekit declares it and ignores it: a recipe
    /// giving it runs with a warning saying this.
    pub ignored: Option<&'static str>,
}

/// The whole-tensor statistics a method takes in streamed passes before its output pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistics {
    /// None: the output is computed element by element.
    None,
    /// Pruning thresholds (magnitude ranks), and L1 norms when rescaling.
    Sparsification,
    /// Norms and dot products of the whole tensors (or rows).
    Norms,
    /// Per-entry variance, its threshold, and the energies of the kept entries (sce).
    Variance,
    /// Row KL divergences and the quartiles of the importances (arcee_fusion).
    Importance,
}

impl Statistics {
    /// The name `modelkin methods` prints.
    pub fn name(self) -> &'static str {
        match self {
            Statistics::None => "none",
            Statistics::Sparsification => "sparsification",
            Statistics::Norms => "norms",
            Statistics::Variance => "variance",
            Statistics::Importance => "importance",
        }
    }
}

/// How many models a method merges besides the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    /// Fewest models besides the base.
    pub min: usize,
    /// Most models besides the base (`usize::MAX`: no limit).
    pub max: usize,
}

/// One row of the method table.
#[derive(Debug, Clone, Copy)]
pub struct MethodSpec {
    /// The method.
    pub method: Method,
    /// Its name in recipes.
    pub name: &'static str,
    /// What it does, in one line.
    pub summary: &'static str,
    /// What it does with `base_model`.
    pub base: BaseUse,
    /// How many models it merges besides the base.
    pub inputs: Inputs,
    /// Its parameters, global and per model.
    pub parameters: &'static [Parameter],
    /// Its task-vector pruning, if any.
    pub sparsification: Option<Sparsification>,
    /// Whether task vectors are combined with TIES sign election.
    pub sign_consensus: bool,
    /// Whether it combines weighted task vectors (base + λ Σ wᵢ τᵢ, pruned and sign-elected as
    /// the row says).
    pub task_vectors: bool,
    /// The statistics passes it needs before the output pass.
    pub statistics: Statistics,
    /// Whether its result is float32 even from half-precision inputs: a float32 factor (RAM+'s λ,
    /// arcee_fusion's mask) promotes it, and mergekit writes it so when no out_dtype is asked.
    pub float32_result: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::engine::table::METHODS;

    #[test]
    fn every_method_has_exactly_one_row_and_its_serde_name() {
        let all = [
            Method::Linear,
            Method::TaskArithmetic,
            Method::Ties,
            Method::DareTies,
            Method::DareLinear,
            Method::Breadcrumbs,
            Method::BreadcrumbsTies,
            Method::Slerp,
            Method::ModelStock,
            Method::Della,
            Method::DellaLinear,
            Method::Sce,
            Method::Nuslerp,
            Method::Multislerp,
            Method::Karcher,
            Method::Passthrough,
            Method::Nearswap,
            Method::Ram,
            Method::RamplusTl,
            Method::ArceeFusion,
        ];
        assert_eq!(all.len(), METHODS.len());
        for method in all {
            assert_eq!(METHODS.iter().filter(|m| m.method == method).count(), 1, "{method:?}");
            // The name recipes use is the one serde reads.
            let parsed: Method = serde_json::from_str(&format!("\"{}\"", method.name())).expect("serde name");
            assert_eq!(parsed, method);
            assert_eq!(Method::named(method.name()), Some(method));
        }
    }

    #[test]
    fn parameter_names_are_unique_within_a_method() {
        for spec in METHODS {
            for (i, p) in spec.parameters.iter().enumerate() {
                assert!(spec.parameters[..i].iter().all(|q| q.name != p.name), "{} {}", spec.name, p.name);
            }
        }
    }

    #[test]
    fn ranges_say_what_they_hold() {
        let unit = Range::closed(0.0, 1.0).unwrap();
        assert!(unit.contains(0.0) && unit.contains(1.0) && !unit.contains(1.5) && !unit.contains(-0.1));
        assert_eq!(unit.text(), "[0, 1]");
        let positive = Range::above(0.0).unwrap();
        assert!(!positive.contains(0.0) && positive.contains(1e-9));
        assert_eq!(positive.text(), "(0, inf)");
    }
}

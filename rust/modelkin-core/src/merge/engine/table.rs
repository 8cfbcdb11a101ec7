//! The method table's rows: every merge method of mergekit 0.1.5, with its defaults.

use crate::merge::engine::method::{
    BaseUse, DefaultValue, Inputs, Method, MethodSpec, Parameter, Range, Scope, Sparsification, Statistics,
};

const ANY: Inputs = Inputs { min: 1, max: usize::MAX };

const fn global(
    name: &'static str,
    default: DefaultValue,
    range: Option<Range>,
    help: &'static str,
) -> Parameter {
    Parameter { name, scope: Scope::Global, default, range, help, ignored: None }
}

const fn per_model(
    name: &'static str,
    default: DefaultValue,
    range: Option<Range>,
    help: &'static str,
) -> Parameter {
    Parameter { name, scope: Scope::PerModel, default, range, help, ignored: None }
}

const WEIGHT: Parameter = per_model("weight", DefaultValue::Required, None, "the model's weight");
const DENSITY: Parameter = per_model(
    "density",
    DefaultValue::Number(1.0),
    Range::closed(0.0, 1.0),
    "fraction of the task vector kept",
);
const LAMBDA: Parameter =
    global("lambda", DefaultValue::Number(1.0), None, "scale of the merged task vector");
const INT8_MASK: Parameter =
    global("int8_mask", DefaultValue::Flag(false), None, "mergekit's mask storage; no effect on the values");
const GAMMA: Parameter = per_model(
    "gamma",
    DefaultValue::Number(0.01),
    Range::closed(0.0, 1.0),
    "fraction of the largest entries dropped",
);
const EPSILON: Parameter = per_model(
    "epsilon",
    DefaultValue::Number(0.15),
    Range::closed(0.0, 1.0),
    "spread of keep probabilities around density",
);
const T: Parameter = global("t", DefaultValue::Required, None, "interpolation position: 0 is the base");

/// mergekit 0.1.5 declares `density` and `rescale` for task_arithmetic but prunes nothing.
const NOT_PRUNED: Option<&str> = Some("task_arithmetic does not prune; ignored, as mergekit ignores it");

const fn normalize(on: bool) -> Parameter {
    global("normalize", DefaultValue::Flag(on), None, "divide by the sum of the weights")
}

const fn rescale(on: bool) -> Parameter {
    global("rescale", DefaultValue::Flag(on), None, "rescale pruned task vectors to keep their L1 norm")
}

/// A task-vector method's row: its parameters and its pruning.
const fn task_vector(
    method: Method,
    name: &'static str,
    summary: &'static str,
    parameters: &'static [Parameter],
    sparsification: Option<Sparsification>,
    sign_consensus: bool,
) -> MethodSpec {
    MethodSpec {
        method,
        name,
        summary,
        base: BaseUse::Required,
        inputs: ANY,
        parameters,
        sparsification,
        sign_consensus,
        task_vectors: true,
        statistics: if sparsification.is_some() { Statistics::Sparsification } else { Statistics::None },
        float32_result: false,
    }
}

/// A row of a method that does not combine weighted task vectors.
const fn other(
    method: Method,
    name: &'static str,
    summary: &'static str,
    base: BaseUse,
    inputs: Inputs,
    parameters: &'static [Parameter],
    statistics: Statistics,
) -> MethodSpec {
    MethodSpec {
        method,
        name,
        summary,
        base,
        inputs,
        parameters,
        sparsification: None,
        sign_consensus: false,
        task_vectors: false,
        statistics,
        float32_result: false,
    }
}

/// Every merge method, in the order `modelkin methods` lists them. Defaults are mergekit 0.1.5's.
pub const METHODS: &[MethodSpec] = &[
    other(
        Method::Linear,
        "linear",
        "weighted average of the models (model soup)",
        BaseUse::Ignored,
        ANY,
        &[WEIGHT, normalize(true)],
        Statistics::None,
    ),
    task_vector(
        Method::TaskArithmetic,
        "task_arithmetic",
        "base + weighted sum of task vectors",
        &[
            WEIGHT,
            Parameter { ignored: NOT_PRUNED, ..DENSITY },
            normalize(false),
            Parameter { ignored: NOT_PRUNED, ..rescale(false) },
            LAMBDA,
            INT8_MASK,
        ],
        None,
        false,
    ),
    task_vector(
        Method::Ties,
        "ties",
        "top-k magnitude pruning + sign election",
        &[WEIGHT, DENSITY, normalize(true), rescale(false), LAMBDA, INT8_MASK],
        Some(Sparsification::Magnitude),
        true,
    ),
    task_vector(
        Method::DareTies,
        "dare_ties",
        "random pruning with L1 rescale + sign election",
        &[WEIGHT, DENSITY, normalize(false), rescale(true), LAMBDA, INT8_MASK],
        Some(Sparsification::Random),
        true,
    ),
    task_vector(
        Method::DareLinear,
        "dare_linear",
        "random pruning with L1 rescale",
        &[WEIGHT, DENSITY, normalize(false), rescale(true), LAMBDA, INT8_MASK],
        Some(Sparsification::Random),
        false,
    ),
    task_vector(
        Method::Breadcrumbs,
        "breadcrumbs",
        "drop the largest gamma and the smallest entries",
        &[WEIGHT, DENSITY, GAMMA, normalize(false), rescale(false), LAMBDA, INT8_MASK],
        Some(Sparsification::MagnitudeOutliers),
        false,
    ),
    task_vector(
        Method::BreadcrumbsTies,
        "breadcrumbs_ties",
        "breadcrumbs + sign election",
        &[WEIGHT, DENSITY, GAMMA, normalize(false), rescale(false), LAMBDA, INT8_MASK],
        Some(Sparsification::MagnitudeOutliers),
        true,
    ),
    task_vector(
        Method::Della,
        "della",
        "magnitude-ranked random pruning per row + sign election",
        &[WEIGHT, DENSITY, EPSILON, normalize(true), rescale(true), LAMBDA, INT8_MASK],
        Some(Sparsification::DellaMagprune),
        true,
    ),
    task_vector(
        Method::DellaLinear,
        "della_linear",
        "magnitude-ranked random pruning per row",
        &[WEIGHT, DENSITY, EPSILON, normalize(false), rescale(true), LAMBDA, INT8_MASK],
        Some(Sparsification::DellaMagprune),
        false,
    ),
    other(
        Method::Sce,
        "sce",
        "select high-variance entries, energy weights, sign election",
        BaseUse::Required,
        ANY,
        &[
            global(
                "select_topk",
                DefaultValue::Number(1.0),
                Range::closed(0.0, 1.0),
                "fraction of entries kept, by variance across the models",
            ),
            INT8_MASK,
        ],
        Statistics::Variance,
    ),
    other(
        Method::Slerp,
        "slerp",
        "spherical interpolation; base_model is t=0",
        BaseUse::Required,
        Inputs { min: 1, max: 1 },
        &[T],
        Statistics::Norms,
    ),
    other(
        Method::ModelStock,
        "model_stock",
        "interpolate to the average by the task vectors' cosine",
        BaseUse::Required,
        Inputs { min: 2, max: usize::MAX },
        &[global("filter_wise", DefaultValue::Flag(false), None, "one factor per row instead of per tensor")],
        Statistics::Norms,
    ),
    other(
        Method::Nuslerp,
        "nuslerp",
        "slerp of two models (or task vectors); t from their weights",
        BaseUse::Optional,
        Inputs { min: 2, max: 2 },
        &[
            WEIGHT,
            global(
                "nuslerp_flatten",
                DefaultValue::Flag(true),
                None,
                "one interpolation over the flattened tensor",
            ),
            global(
                "nuslerp_row_wise",
                DefaultValue::Flag(false),
                None,
                "without flattening: rows, not columns",
            ),
        ],
        Statistics::Norms,
    ),
    other(
        Method::Multislerp,
        "multislerp",
        "barycentric interpolation of several models on the hypersphere",
        BaseUse::Optional,
        ANY,
        &[
            WEIGHT,
            global("normalize_weights", DefaultValue::Flag(true), None, "divide the weights by their sum"),
            global("eps", DefaultValue::Number(1e-8), Range::above(0.0), "numerical floor of norms"),
        ],
        Statistics::Norms,
    ),
    other(
        Method::Karcher,
        "karcher",
        "Riemannian (Karcher) mean of the models' directions",
        BaseUse::AsInput,
        ANY,
        &[
            global(
                "max_iter",
                DefaultValue::Integer(10),
                Some(Range { low: 1.0, high: f64::INFINITY, low_open: false, high_open: true }),
                "iterations",
            ),
            global("tol", DefaultValue::Number(1e-5), Range::above(0.0), "convergence tolerance"),
        ],
        Statistics::Norms,
    ),
    other(
        Method::Passthrough,
        "passthrough",
        "copy one model's tensors (times its scale)",
        BaseUse::Ignored,
        Inputs { min: 1, max: 1 },
        &[per_model("scale", DefaultValue::Number(1.0), None, "factor the tensor is multiplied by")],
        Statistics::None,
    ),
    MethodSpec {
        float32_result: true,
        ..other(
            Method::ArceeFusion,
            "arcee_fusion",
            "keep the other model's changes whose softmax-KL importance is an outlier (median + 1.5 IQR)",
            BaseUse::Required,
            Inputs { min: 1, max: 1 },
            &[global(
                "exact_quantiles",
                DefaultValue::Flag(false),
                None,
                "modelkin: exact quartiles instead of mergekit's sample of a million in larger tensors",
            )],
            Statistics::Importance,
        )
    },
    other(
        Method::Ram,
        "ram",
        "keep task-vector entries one model contributes, average the shared ones",
        BaseUse::Required,
        ANY,
        &[global(
            "epsilon",
            DefaultValue::Number(1e-5),
            Range::closed(0.0, f64::INFINITY),
            "entries below count as zero",
        )],
        Statistics::None,
    ),
    MethodSpec {
        float32_result: true,
        ..other(
            Method::RamplusTl,
            "ramplus_tl",
            "RAM with each model's own entries scaled by its shared-to-unique ratio",
            BaseUse::Required,
            ANY,
            &[
                global(
                    "r",
                    DefaultValue::Number(0.1),
                    None,
                    "how far λ moves with the shared-to-unique ratio",
                ),
                global("alpha", DefaultValue::Number(0.2), None, "cap of λ's growth"),
                global(
                    "epsilon",
                    DefaultValue::Number(1e-5),
                    Range::closed(0.0, f64::INFINITY),
                    "entries below count as zero",
                ),
            ],
            Statistics::Norms,
        )
    },
    other(
        Method::Nearswap,
        "nearswap",
        "take the other model's value where it is within t of the base's",
        BaseUse::Required,
        Inputs { min: 1, max: 1 },
        &[T],
        Statistics::None,
    ),
];

// The lookups read the rows, and the rows are made of the types in `method.rs`: they live here,
// with the rows, so that `method.rs` imports nothing of the table.
impl Method {
    /// This method's row of [`METHODS`].
    pub fn spec(self) -> &'static MethodSpec {
        METHODS.iter().find(|m| m.method == self).expect("every method has a row in METHODS")
    }

    /// The method named `name` in recipes.
    pub fn named(name: &str) -> Option<Method> {
        METHODS.iter().find(|m| m.name == name).map(|m| m.method)
    }

    /// Its name in recipes.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub(crate) fn sparsification(self) -> Option<Sparsification> {
        self.spec().sparsification
    }

    pub(crate) fn sign_consensus(self) -> bool {
        self.spec().sign_consensus
    }

    pub(crate) fn task_vectors(self) -> bool {
        self.spec().task_vectors
    }
}

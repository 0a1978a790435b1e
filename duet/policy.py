"""The owner's allowlist: the only door through which a researcher's operation runs.

Everything a researcher may run is named in the tables below, which a data steward can read:
functions by qualified name, and methods and attributes per *type family* (``ndarray``,
``Tensor``, ``Module``, ...). Names arriving from the peer are never handed to ``getattr`` on
an arbitrary object: a function name is looked up as a key of a registry that was filled at
construction by walking our own tables, and a method or attribute name is used only after the
object's family was determined by ``isinstance`` and ``"<family>.<name>"`` was found registered.

Some names are never reachable, whatever the owner allows: private and dunder names (any dotted
component starting with ``_``), non-ASCII lookalikes, and the ``DENIED`` list (files, processes,
network, imports, serialization, raw memory, hooks that run code).

Methods marked *mutating* change their object in place; the executor refuses them on objects
that are, or alias, shared data, so the owner's data never changes under them.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import numpy as np

from . import dtypes
from .errors import PolicyViolation
from .protocol import MAX_VALUE_DEPTH, AllowlistSummary, DTypeRef, Op

__all__ = [
    "ATTRIBUTES",
    "DENIED",
    "DTYPES",
    "FUNCTIONS",
    "FUNCTION_NAMES",
    "METHODS",
    "MUTATING_METHODS",
    "Allowlist",
    "AllowlistSpec",
    "check_described",
    "check_name",
]

# -- what a researcher may run --------------------------------------------------------------
# (namespace, space-separated names). A namespace may appear in several commented groups.
# Names missing from the installed numpy/torch version are skipped.
FUNCTIONS: tuple[tuple[str, str], ...] = (
    # Python operators: a Pointer maps +, -, *, @, ~, <, [], ... to these.
    ("operator", """add sub mul truediv floordiv mod pow matmul neg pos abs invert
                    and_ or_ xor lt le eq ne gt ge getitem"""),
    # Copies, e.g. to fine-tune a copy of a shared model instead of the owner's own.
    ("copy", "copy deepcopy"),
    # numpy: reductions and statistics
    ("numpy", """sum mean std var min max amin amax argmin argmax median percentile quantile
                 prod cumsum cumprod all any count_nonzero average ptp corrcoef cov"""),
    ("numpy", """nansum nanmean nanstd nanvar nanmin nanmax nanmedian nanpercentile
                 nanquantile nanargmin nanargmax nancumsum nanprod"""),
    # numpy: elementwise math and comparison
    ("numpy", """exp expm1 exp2 log log1p log2 log10 sqrt square abs absolute sin cos tan
                 arcsin arccos arctan arctan2 sinh cosh tanh clip round around floor ceil trunc
                 rint sign isnan isinf isfinite maximum minimum fmax fmin add subtract multiply
                 divide true_divide floor_divide power mod remainder negative positive
                 reciprocal logical_and logical_or logical_not logical_xor greater
                 greater_equal less less_equal equal not_equal nan_to_num isclose allclose
                 array_equal"""),
    # numpy: selection, shape, sorting, binning
    ("numpy", """where nonzero argwhere flatnonzero take extract searchsorted select
                 concatenate stack vstack hstack dstack column_stack reshape ravel transpose
                 moveaxis swapaxes squeeze expand_dims atleast_1d atleast_2d broadcast_to tile
                 repeat flip split array_split diff sort argsort unique lexsort histogram
                 histogram2d histogramdd bincount digitize"""),
    # numpy: products and creation (from literals the researcher sends)
    ("numpy", """dot matmul outer inner einsum tensordot vdot kron cross trace diag arange
                 zeros ones full linspace logspace eye identity zeros_like ones_like full_like
                 array asarray meshgrid tri triu tril"""),
    ("numpy.linalg", """norm inv solve eig eigh eigvals svd det pinv matrix_rank qr cholesky
                        lstsq slogdet"""),
    # torch: creation and randomness
    ("torch", """tensor as_tensor from_numpy zeros ones zeros_like ones_like full arange
                 linspace eye randn rand randint randn_like rand_like randperm manual_seed"""),
    # torch: tensor math
    ("torch", """cat concat stack hstack vstack matmul mm bmm einsum outer dot sum mean std var
                 max min argmax argmin median quantile prod cumsum logsumexp norm softmax
                 log_softmax sigmoid tanh relu exp log log1p sqrt abs clamp clip round floor
                 ceil sign where maximum minimum add sub mul div pow neg eq ne gt ge lt le
                 isnan isfinite nan_to_num allclose isclose equal count_nonzero"""),
    # torch: shape, selection, sorting
    ("torch", """flatten reshape squeeze unsqueeze transpose permute chunk split gather
                 masked_select nonzero sort argsort topk unique diag tril triu bincount histc
                 numel"""),
    # torch: autograd mode (``with torch.no_grad()`` is sent as set_grad_enabled(False/True))
    ("torch", "set_grad_enabled is_grad_enabled"),
    ("torch.linalg", "norm inv solve det svd eigh pinv qr"),
    # torch.nn: layers, containers, losses
    ("torch.nn", """Linear Bilinear Conv1d Conv2d ReLU LeakyReLU GELU SiLU ELU Sigmoid Tanh
                    Softmax LogSoftmax Dropout BatchNorm1d BatchNorm2d LayerNorm Embedding
                    Flatten Unflatten Identity MaxPool1d MaxPool2d AvgPool1d AvgPool2d
                    AdaptiveAvgPool2d RNN LSTM GRU Parameter"""),
    ("torch.nn", "Sequential ModuleList ModuleDict"),
    ("torch.nn", """MSELoss CrossEntropyLoss BCELoss BCEWithLogitsLoss NLLLoss L1Loss
                    SmoothL1Loss HuberLoss KLDivLoss"""),
    ("torch.nn.functional", """relu leaky_relu gelu silu elu sigmoid tanh softmax log_softmax
                               linear dropout one_hot normalize pad conv1d conv2d max_pool2d
                               avg_pool2d embedding layer_norm cross_entropy mse_loss nll_loss
                               binary_cross_entropy binary_cross_entropy_with_logits l1_loss
                               smooth_l1_loss kl_div"""),
    # torch.optim: optimizers and learning-rate schedules
    ("torch.optim", "SGD Adam AdamW RMSprop Adagrad"),
    ("torch.optim.lr_scheduler", "StepLR ExponentialLR CosineAnnealingLR"),
    # pandas: building, combining and reshaping tables; binning and conversion. Functions
    # that take a function take only names of the reductions in FUNCTION_NAMES.
    ("pandas", """DataFrame Series Categorical crosstab merge concat get_dummies cut qcut
                  pivot_table melt to_numeric to_datetime to_timedelta isna notna unique
                  factorize"""),
    # scikit-learn: estimators (fit changes the researcher's estimator, never shared data),
    # model selection, pipelines and metrics. Callables are never accepted as arguments.
    ("sklearn.linear_model", """LinearRegression LogisticRegression Ridge Lasso ElasticNet
                                SGDClassifier SGDRegressor"""),
    ("sklearn.ensemble", """RandomForestClassifier RandomForestRegressor
                            GradientBoostingClassifier GradientBoostingRegressor
                            HistGradientBoostingClassifier HistGradientBoostingRegressor"""),
    ("sklearn.tree", "DecisionTreeClassifier DecisionTreeRegressor"),
    ("sklearn.neighbors", "KNeighborsClassifier KNeighborsRegressor"),
    ("sklearn.naive_bayes", "GaussianNB"),
    ("sklearn.svm", "LinearSVC SVC"),
    ("sklearn.cluster", "KMeans"),
    ("sklearn.decomposition", "PCA"),
    ("sklearn.preprocessing", """StandardScaler MinMaxScaler RobustScaler OneHotEncoder
                                 OrdinalEncoder LabelEncoder PolynomialFeatures
                                 KBinsDiscretizer"""),
    ("sklearn.impute", "SimpleImputer"),
    ("sklearn.pipeline", "Pipeline make_pipeline"),
    ("sklearn.compose", "ColumnTransformer make_column_transformer"),
    ("sklearn.model_selection", """train_test_split cross_val_score cross_validate
                                   cross_val_predict KFold StratifiedKFold GridSearchCV"""),
    ("sklearn.metrics", """accuracy_score balanced_accuracy_score precision_score
                           recall_score f1_score roc_auc_score log_loss confusion_matrix
                           mean_squared_error mean_absolute_error r2_score"""),
)

# Methods per family that leave their object unchanged.
METHODS: tuple[tuple[str, str], ...] = (
    ("ndarray", """sum mean std var min max argmin argmax prod cumsum cumprod any all astype
                   reshape flatten ravel transpose swapaxes squeeze copy clip round dot take
                   repeat nonzero argsort searchsorted diagonal trace conj item tolist"""),
    ("Tensor", """abs add sub mul div pow matmul mm sum mean std var max min argmax argmin
                  prod cumsum logsumexp norm median quantile softmax log_softmax sigmoid tanh
                  relu exp log log1p sqrt square neg reciprocal sin cos clamp clip round floor
                  ceil sign where eq ne gt ge lt le isnan isfinite nan_to_num any all allclose
                  equal count_nonzero flatten reshape reshape_as view view_as squeeze unsqueeze
                  permute transpose t expand expand_as repeat chunk split gather masked_fill
                  nonzero sort argsort topk unique bincount size dim numel item tolist numpy
                  detach clone contiguous cpu to float double half int long bool type_as"""),
    # (a module's forward runs by calling the module: op kind "call", see check_call)
    ("Module", """parameters named_parameters buffers named_buffers children named_children
                  modules named_modules state_dict"""),
    ("Optimizer", "state_dict"),
    ("Scheduler", "get_last_lr state_dict"),
    ("list", "index count"),
    ("tuple", "index count"),
    ("dict", "keys values items get"),
    # pandas: what an analyst does with a table. Nothing here changes its object (pandas 3
    # copies on write, and inplace=True is refused everywhere).
    ("DataFrame", """head tail sum mean median std var sem min max count nunique prod
                     quantile describe corr cov skew kurt mode abs round clip fillna ffill
                     bfill dropna astype convert_dtypes isna notna isnull notnull isin
                     groupby agg aggregate transform apply value_counts pivot_table pivot
                     melt stack unstack merge join assign drop drop_duplicates duplicated
                     rename sort_values sort_index reset_index set_index sample nlargest
                     nsmallest select_dtypes filter get copy to_numpy cumsum cumprod cummax
                     cummin diff pct_change rank shift where mask replace idxmin idxmax any
                     all add sub mul div truediv floordiv mod pow radd rsub rmul rdiv eq ne
                     lt le gt ge dot transpose squeeze reindex explode"""),
    ("Series", """head tail sum mean median std var sem min max count nunique prod quantile
                  describe corr cov skew kurt mode abs round clip fillna ffill bfill dropna
                  astype convert_dtypes isna notna isnull notnull isin between groupby agg
                  aggregate transform apply map value_counts unique drop drop_duplicates
                  duplicated rename sort_values sort_index reset_index sample nlargest
                  nsmallest get copy to_numpy to_frame to_list tolist cumsum cumprod cummax
                  cummin diff pct_change rank shift where mask replace idxmin idxmax argmin
                  argmax any all add sub mul div truediv floordiv mod pow radd rsub rmul rdiv
                  eq ne lt le gt ge dot squeeze reindex explode"""),
    ("Index", """to_numpy to_list tolist unique nunique isin astype copy min max
                 argmin argmax value_counts to_series to_frame"""),
    ("GroupBy", """agg aggregate transform mean median sum prod min max std var sem count
                   size nunique first last describe quantile cumsum cumcount cummax cummin
                   rank shift diff head tail any all idxmin idxmax value_counts ngroup"""),
    ("StringMethods", """lower upper strip lstrip rstrip len contains startswith endswith
                         replace slice get split cat zfill pad isdigit isalpha isnumeric"""),
    ("Datetimelike", "strftime normalize floor ceil round total_seconds"),
    ("CategoricalAccessor", """add_categories remove_categories remove_unused_categories
                               rename_categories reorder_categories set_categories as_ordered
                               as_unordered"""),
    # scikit-learn estimators; fit and friends are in MUTATING_METHODS
    ("Estimator", """predict predict_proba predict_log_proba decision_function score
                     transform inverse_transform get_params get_feature_names_out"""),
)

# Methods that change their object in place: refused on shared data (and anything aliasing it).
MUTATING_METHODS: tuple[tuple[str, str], ...] = (
    ("ndarray", "sort fill resize put partition"),
    # torch's trailing underscore means in place; backward writes .grad of the graph's leaves.
    ("Tensor", """backward retain_grad requires_grad_ zero_ fill_ add_ sub_ mul_ div_ clamp_
                  masked_fill_ uniform_ normal_"""),
    ("Module", "train eval zero_grad load_state_dict requires_grad_ to float double"),
    ("Optimizer", "step zero_grad load_state_dict"),
    ("Scheduler", "step"),
    # fitting changes the estimator (the researcher's own object): refused on shared ones
    ("Estimator", "fit partial_fit fit_transform fit_predict set_params"),
)

ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("ndarray", "T shape dtype ndim size itemsize nbytes real imag"),
    ("Tensor", "T mT shape dtype device ndim grad requires_grad is_leaf"),
    ("Module", """weight bias training in_features out_features in_channels out_channels
                  kernel_size stride padding num_features running_mean running_var
                  normalized_shape eps num_embeddings embedding_dim hidden_size num_layers p"""),
    ("Optimizer", "param_groups defaults"),
    ("Scheduler", "last_epoch"),
    # named results such as torch.max(x, dim=0).values
    ("tuple", "values indices"),
    # pandas: shape, labels and the index are data of derived tables (pointers, like all)
    ("DataFrame", "shape columns index dtypes ndim size empty T values loc iloc at iat"),
    ("Series", """shape index dtype name ndim size empty T values loc iloc at iat str dt cat
                  hasnans is_unique is_monotonic_increasing is_monotonic_decreasing"""),
    ("Index", "name names shape size dtype ndim nlevels is_unique str"),
    ("GroupBy", "ngroups groups indices"),
    ("Datetimelike", """year month day hour minute second dayofweek day_of_week dayofyear
                        quarter date days seconds"""),
    ("CategoricalAccessor", "codes categories ordered"),
    # fitted attributes of scikit-learn estimators (they come back only through a request)
    ("Estimator", """coef_ intercept_ classes_ n_features_in_ feature_names_in_
                     feature_importances_ n_iter_ mean_ scale_ var_ n_samples_seen_ min_
                     data_min_ data_max_ categories_ components_ explained_variance_
                     explained_variance_ratio_ cluster_centers_ labels_ inertia_
                     best_params_ best_score_ best_estimator_ cv_results_ named_steps steps
                     statistics_ n_outputs_ estimators_ class_prior_ theta_"""),
)

# Never reachable, and ``allow`` refuses them. A pattern matches a name or any dotted prefix.
DENIED: tuple[str, ...] = (
    # Python itself: code, imports, files, processes, network, introspection
    "builtins", "eval", "exec", "compile", "open", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "input", "breakpoint", "os", "sys", "subprocess", "socket",
    "importlib", "pickle", "marshal", "shelve", "copyreg", "shutil", "io", "pathlib",
    "tempfile", "ctypes", "multiprocessing", "threading", "signal", "inspect", "gc", "code",
    "runpy", "types", "urllib", "http", "ftplib", "smtplib", "asyncio", "sqlite3", "zipfile",
    "tarfile", "webbrowser", "dill", "cloudpickle", "joblib",
    # numpy: file I/O, raw memory, Python callbacks
    "numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.memmap", "numpy.fromregex",
    "numpy.frombuffer", "numpy.lib", "numpy.ctypeslib", "numpy.DataSource", "numpy.frompyfunc",
    "numpy.vectorize", "numpy.piecewise", "numpy.apply_along_axis", "numpy.apply_over_axes",
    "numpy.rec", "numpy.core", "numpy.testing", "numpy.f2py", "numpy.distutils",
    "numpy.copyto", "numpy.put", "numpy.place", "numpy.putmask", "numpy.fill_diagonal",
    "ndarray.dump", "ndarray.dumps", "ndarray.tofile", "ndarray.ctypes", "ndarray.data",
    "ndarray.base", "ndarray.setflags", "ndarray.flags", "ndarray.view",
    # torch: serialization, code loading/compilation, raw storage, hooks
    "torch.load", "torch.save", "torch.hub", "torch.jit", "torch.compile", "torch.ops",
    "torch.classes", "torch.utils", "torch.package", "torch.serialization", "torch.library",
    "torch.fx", "torch.export", "torch.onnx", "torch.distributed", "torch.multiprocessing",
    "torch.from_file", "torch.Storage", "torch.UntypedStorage", "torch.backends",
    "Tensor.storage", "Tensor.untyped_storage", "Tensor.data_ptr", "Tensor.set_",
    "Tensor.share_memory_", "Tensor.register_*", "Tensor.data",
    "Module.apply", "Module.register_*", "Module.add_module", "Module.get_submodule",
    "Module.set_extra_state", "Module.share_memory",
    "Optimizer.register_*", "Optimizer.add_param_group", "Scheduler.register_*",
    # pandas: code in strings (query/eval), files, the clipboard, plots and styles (which
    # run matplotlib/jinja), functions applied elementwise, global options, internals
    "pandas.eval", "pandas.read_*", "pandas.io", "pandas.plotting", "pandas.api",
    "pandas.core", "pandas.util", "pandas.testing", "pandas.compat", "pandas.errors",
    "pandas.options", "pandas.set_option", "pandas.reset_option", "pandas.option_context",
    "pandas.describe_option", "pandas.show_versions", "pandas.ExcelWriter",
    "pandas.ExcelFile", "pandas.HDFStore", "pandas.json_normalize",
    "DataFrame.query", "DataFrame.eval", "DataFrame.style", "*.plot", "*.hist",
    "*.boxplot", "*.pipe", "DataFrame.map", "DataFrame.applymap", "GroupBy.apply",
    "GroupBy.filter", "GroupBy.plot", "*.to_pickle", "*.to_csv", "*.to_parquet",
    "*.to_feather", "*.to_sql", "*.to_hdf", "*.to_excel", "*.to_json", "*.to_html",
    "*.to_latex", "*.to_clipboard", "*.to_stata", "*.to_orc", "*.to_xml", "*.to_markdown",
    "*.to_gbq", "*.to_string", "DataFrame.attrs", "Series.attrs", "DataFrame.flags",
    "Series.flags", "DataFrame.set_flags", "Series.set_flags", "DataFrame.insert",
    "DataFrame.pop", "Series.pop", "DataFrame.update", "Series.update",
    # scikit-learn: persistence and downloads, global configuration, estimators built
    # around the researcher's functions, plots
    "sklearn.datasets", "sklearn.externals", "sklearn.utils", "sklearn.experimental",
    "sklearn.tests", "sklearn.set_config", "sklearn.config_context", "sklearn.show_versions",
    "sklearn.preprocessing.FunctionTransformer", "sklearn.compose.TransformedTargetRegressor",
    "sklearn.metrics.make_scorer", "sklearn.metrics.get_scorer", "sklearn.*.*Display",
    "Estimator.set_output",
)

# Names the func/aggfunc of pandas' agg, aggregate, transform, apply, pivot_table and
# crosstab may take: pandas looks a name up on the object and calls it, so an arbitrary
# name would reach any method (``agg("to_pickle", path)``). Callables are never accepted.
FUNCTION_NAMES: frozenset[str] = frozenset("""
    sum mean median min max std var sem count size nunique first last prod any all idxmin
    idxmax skew kurt quantile describe cumsum cumprod cummin cummax cumcount rank shift diff
    pct_change abs round ffill bfill
""".split())

# dtype names a researcher may send (DTypeRef): the one table both ends use.
DTYPES: tuple[str, ...] = dtypes.CANONICAL

AllowlistSpec = dict[str, Any]
"""An allowlist as plain data (``Allowlist.spec()``), to rebuild it in the worker process."""

_COMPONENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_MAX_NAME = 200
_WRITE_ARGUMENTS = ("out", "inplace")


def check_name(name: str, *, dotted: bool = True) -> list[str]:
    """Split a peer-supplied name into components, refusing anything that is not plain ASCII.

    Private and dunder components, empty components, whitespace and unicode lookalikes are
    refused here, before any lookup.
    """
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise PolicyViolation("an operation name must be a non-empty string")
    parts = name.split(".")
    if not dotted and len(parts) != 1:
        raise PolicyViolation(f"{name!r} must be a single name, not a dotted path")
    for part in parts:
        if not part:
            raise PolicyViolation(f"{name!r} has an empty component")
        if part.startswith("_"):
            raise PolicyViolation(
                f"{name!r}: private and dunder names are never reachable through duet"
            )
        if not part.isascii() or not _COMPONENT.fullmatch(part):
            raise PolicyViolation(f"{name!r} is not a plain ASCII identifier path")
    return parts


def _denied(qualname: str) -> str | None:
    """The DENIED pattern that covers ``qualname`` (or one of its dotted prefixes), if any."""
    parts = qualname.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        for pattern in DENIED:
            if fnmatch.fnmatchcase(prefix, pattern):
                return pattern
    return None


def _words(groups: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    for namespace, names in groups:
        for name in names.split():
            yield namespace, name


# Families of packages that load slowly (pandas, scikit-learn) name their class as
# "module:attribute": an object can be of such a family only once its module is imported,
# so ``family`` looks them up only then and a session that never uses them never pays.
_LAZY_FAMILIES: dict[str, str] = {
    "DataFrame": "pandas:DataFrame",
    "Series": "pandas:Series",
    "Index": "pandas:Index",
    "GroupBy": "pandas.core.groupby.groupby:GroupBy",
    "StringMethods": "pandas.core.strings.accessor:StringMethods",
    "Datetimelike": "pandas.core.indexes.accessors:Properties",
    "CategoricalAccessor": "pandas.core.arrays.categorical:CategoricalAccessor",
    "Estimator": "sklearn.base:BaseEstimator",
}
# Top-level packages whose table functions are registered by name and vetted on first use.
_LAZY_PACKAGES = ("pandas", "sklearn")


def _family_classes() -> dict[str, type | str]:
    """Family name -> class (or "module:attribute" for lazy ones), in the order ``family``
    tests them (most specific first)."""
    classes: dict[str, type | str] = {}
    try:
        import torch
    except ImportError:  # an owner sharing only numpy needs no torch
        torch = None  # type: ignore[assignment]
    if torch is not None:
        classes["Tensor"] = torch.Tensor
        classes["Module"] = torch.nn.Module
        classes["Optimizer"] = torch.optim.Optimizer
        classes["Scheduler"] = torch.optim.lr_scheduler.LRScheduler
    classes.update(_LAZY_FAMILIES)
    classes["ndarray"] = np.ndarray
    classes["dict"] = dict
    classes["list"] = list
    classes["tuple"] = tuple
    return classes


def _import_path(qualname: str) -> Any:
    """Resolve a qualified name from *our* tables or the owner's ``allow`` (never the peer)."""
    parts = qualname.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise AttributeError(qualname)


def _writes_through(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes an ``out``/``inplace`` parameter that could be passed positionally."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature take ``out`` by keyword
        return False
    return any(
        p.name in _WRITE_ARGUMENTS
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params.values()
    )


def _copy_if_readonly(convert: Callable[..., Any]) -> Callable[..., Any]:
    """torch.from_numpy/as_tensor alias numpy memory even when it is read-only (shared data);
    copy such arrays first so the resulting tensor cannot write into the owner's array."""

    def safe(data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, np.ndarray) and not data.flags.writeable:
            data = data.copy()
        return convert(data, *args, **kwargs)

    safe.__name__ = convert.__name__
    safe.__qualname__ = convert.__qualname__
    return safe


_SAFE_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "torch.from_numpy": _copy_if_readonly,
    "torch.as_tensor": _copy_if_readonly,
}


class Allowlist:
    """A session's registry of runnable functions, methods and attributes.

    Build one with ``Allowlist.default()``; the owner may ``allow`` or ``deny`` names for a
    session. Every lookup either returns a vetted object or raises ``PolicyViolation``.
    """

    def __init__(self) -> None:
        self._families = _family_classes()
        # None: a table name of a lazy package, vetted like any other on first use
        self._functions: dict[str, Callable[..., Any] | None] = {}
        self._writes_through: set[str] = set()
        self._methods: dict[str, bool] = {}  # "family.name" -> mutating
        self._attributes: set[str] = set()

    @classmethod
    def default(cls) -> Allowlist:
        allowlist = cls()
        for namespace, name in _words(FUNCTIONS):
            if namespace.split(".")[0] == "torch" and "Tensor" not in allowlist._families:
                continue
            if namespace.split(".")[0] in _LAZY_PACKAGES:
                allowlist._functions[f"{namespace}.{name}"] = None
                continue
            try:
                allowlist._add_function(f"{namespace}.{name}")
            except AttributeError:  # not in this numpy/torch version
                continue
        for mutating, groups in ((False, METHODS), (True, MUTATING_METHODS)):
            for family, name in _words(groups):
                if family in allowlist._families:
                    allowlist._methods[f"{family}.{name}"] = mutating
        for family, name in _words(ATTRIBUTES):
            if family in allowlist._families:
                allowlist._attributes.add(f"{family}.{name}")
        return allowlist

    @property
    def families(self) -> tuple[str, ...]:
        """The type families this process knows (``Tensor`` and friends only with torch)."""
        return tuple(self._families)

    def spec(self) -> AllowlistSpec:
        """Everything allowed, as names: ``from_spec`` rebuilds it, vetting each again."""
        return {"functions": sorted(self._functions), "methods": dict(self._methods),
                "attributes": sorted(self._attributes)}

    @classmethod
    def from_spec(cls, spec: AllowlistSpec) -> Allowlist:
        allowlist = cls()
        for qualname in spec["functions"]:
            if qualname in _LAZY_TABLE_NAMES:
                allowlist._functions[qualname] = None
            elif _denied(qualname) is None:
                try:
                    allowlist._add_function(qualname)
                except (AttributeError, ValueError):
                    continue
        for key, mutating in spec["methods"].items():
            if key.split(".", 1)[0] in allowlist._families and _denied(key) is None:
                allowlist._methods[key] = bool(mutating)
        allowlist._attributes = {k for k in spec["attributes"]
                                 if k.split(".", 1)[0] in allowlist._families
                                 and _denied(k) is None}
        return allowlist

    def copy(self) -> Allowlist:
        other = type(self)()
        other._functions = dict(self._functions)
        other._writes_through = set(self._writes_through)
        other._methods = dict(self._methods)
        other._attributes = set(self._attributes)
        return other

    # -- the owner edits ----------------------------------------------------------------------
    def allow(self, *names: str, mutating: bool = False) -> None:
        """Add functions (``"numpy.fft.fft"``) or family members (``"Tensor.cumprod"``).

        Raises ``ValueError`` for names that can never be allowed (private, dunder, DENIED,
        in-place functions, modules) or that do not exist; then nothing at all is allowed.
        """
        trial = self.copy()  # all or nothing: one bad name leaves the allowlist as it was
        trial._allow(names, mutating=mutating)
        self._functions, self._writes_through = trial._functions, trial._writes_through
        self._methods, self._attributes = trial._methods, trial._attributes

    def _allow(self, names: tuple[str, ...], *, mutating: bool) -> None:
        for name in names:
            try:
                parts = check_name(name)
            except PolicyViolation as exc:
                raise ValueError(str(exc)) from None
            pattern = _denied(name)
            if pattern is not None:
                raise ValueError(f"{name!r} can never be allowed (denied by {pattern!r})")
            if len(parts) < 2:
                raise ValueError(f"{name!r}: give a qualified name such as 'numpy.mean'")
            if parts[0] in self._families and len(parts) == 2:
                self._allow_member(parts[0], parts[1], mutating=mutating)
            else:
                if parts[-1].endswith("_"):
                    raise ValueError(
                        f"{name!r} works in place and could modify shared data; "
                        "allow the method form (e.g. 'Tensor.name_') instead"
                    )
                try:
                    self._add_function(name)
                except AttributeError:
                    raise ValueError(f"{name!r} does not exist") from None

    def deny(self, *names: str) -> None:
        """Remove names; a namespace (``"numpy.linalg"``, ``"Tensor"``) removes all under it."""
        for name in names:
            prefix = name + "."
            for table in (self._functions, self._methods):
                for key in [k for k in table if k == name or k.startswith(prefix)]:
                    del table[key]
            self._attributes = {
                k for k in self._attributes if k != name and not k.startswith(prefix)
            }

    def _add_function(self, qualname: str) -> None:
        obj = _import_path(qualname)
        runnable = callable(obj) and not isinstance(obj, types.ModuleType)
        if not runnable:
            raise ValueError(f"{qualname!r} is not a function or class")
        parent = _import_path(qualname.rsplit(".", 1)[0]) if "." in qualname else None
        if isinstance(parent, type):
            # ndarray.tofile reached as numpy.ndarray.tofile, UntypedStorage.from_file ...:
            # a class's members are allowed only per family, where the denylist sees them
            raise ValueError(f"{qualname!r} is a member of class {parent.__name__}; allow a "
                             "method of a family instead, e.g. 'ndarray.cumprod'")
        if any(obj is forbidden for forbidden in _forbidden_objects()):
            raise ValueError(f"{qualname!r} is an alias of a denied function")
        wrapper = _SAFE_WRAPPERS.get(qualname)
        self._functions[qualname] = wrapper(obj) if wrapper else obj
        if _writes_through(obj):
            self._writes_through.add(qualname)

    def _allow_member(self, family: str, name: str, *, mutating: bool) -> None:
        cls = _family_class(self._families[family], load=True)
        member = inspect.getattr_static(cls, name, None)
        key = f"{family}.{name}"
        if member is not None and inspect.isroutine(member):
            self._methods[key] = mutating or name.endswith("_")
        else:  # properties, descriptors and instance attributes such as Module.weight
            self._attributes.add(key)

    # -- lookups (peer-supplied names) --------------------------------------------------------
    def resolve_function(self, qualname: str) -> Callable[..., Any]:
        check_name(qualname)
        try:
            fn = self._functions[qualname]
        except KeyError:
            raise PolicyViolation(_not_allowed(qualname, list(self._functions))) from None
        if fn is None:  # a lazy table name: vetted now, as at construction
            try:
                self._add_function(qualname)
            except (AttributeError, ImportError, ValueError):
                raise PolicyViolation(f"{qualname} is not available on the owner's side "
                                      "(not in the installed version)") from None
            fn = self._functions[qualname]
            assert fn is not None
        return fn

    def resolve_method(self, obj: object, name: str, *, shared: bool | str) -> Callable[..., Any]:
        """The bound method ``name`` of ``obj``, if its family allows it.

        ``shared`` is truthy when ``obj`` is, or aliases, shared data (a string names it); a
        mutating method is then refused.
        """
        family, key = self._member(obj, name, self._methods)
        if self._methods[key] and shared:
            what = f"shared object {shared!r}" if isinstance(shared, str) else "a shared object"
            raise PolicyViolation(
                f"{key} would modify {what}; the owner's data cannot change. "
                f"Work on a copy: {_copy_hint(family, shared)}"
            )
        method = getattr(obj, name)  # name vetted above
        if not callable(method):
            raise PolicyViolation(f"{key} is not a method")
        return method  # type: ignore[no-any-return]

    def resolve_attribute(self, obj: object, name: str) -> Any:
        self._member(obj, name, self._attributes)
        return getattr(obj, name)  # name vetted above

    def _member(self, obj: object, name: str, table: Collection[str]) -> tuple[str, str]:
        """``(family, "family.name")`` if ``table`` allows ``name`` on ``obj``'s family."""
        check_name(name, dotted=False)
        family = self.family(obj)
        if family is None:
            raise PolicyViolation(_NO_MEMBERS.format(name=name))
        key = f"{family}.{name}"
        if key not in table:
            raise PolicyViolation(_not_allowed(key, list(table)))
        return family, key

    def check_call(self, obj: object, *, shared: bool | str) -> None:
        """Calling an object is allowed only for torch modules (their forward)."""
        if self.family(obj) != "Module":
            raise PolicyViolation(
                "only torch.nn modules can be called; call a function or method instead"
            )
        if shared and self.call_mutates(obj):
            raise PolicyViolation(
                "calling a module in training mode would update running statistics of shared "
                f"object {shared!r}; call it in eval mode or on a copy"
            )

    def check_arguments(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
        *, qualname: str | None = None,
    ) -> None:
        """Refuse ``out=`` and ``inplace=True``: they write into an existing object, possibly
        shared data, behind the mutating-method check."""
        if kwargs.get("out") is not None:
            raise PolicyViolation("out= writes into an existing object; use the result instead")
        if kwargs.get("inplace"):
            raise PolicyViolation("inplace=True is not allowed; use the result instead")
        check_values(fn, args, kwargs, self)
        if isinstance(fn, np.ufunc) and len(args) > fn.nin:
            raise PolicyViolation(f"{fn.__name__} takes no positional output argument here")
        if qualname in self._writes_through:
            bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
            if bound.get("out") is not None or bound.get("inplace"):
                raise PolicyViolation(f"{qualname} with out/inplace is not allowed")

    def is_mutating(self, obj: object, name: str) -> bool:
        return self._methods.get(f"{self.family(obj)}.{name}", False)

    def call_mutates(self, obj: object) -> bool:
        """Whether calling module ``obj`` changes it: training-mode batch norm updates its
        running statistics."""
        if self.family(obj) != "Module" or not getattr(obj, "training", False):
            return False
        import torch

        return any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for m in obj.modules()  # type: ignore[attr-defined]
        )

    def resolve_dtype(self, name: str, *, torch: bool = False) -> Any:
        """A numpy (or, with ``torch=True`` or a ``torch.`` prefix, torch) dtype by name."""
        if not isinstance(name, str):
            raise PolicyViolation("a dtype name must be a string")
        if (torch or name.startswith("torch.")) and "Tensor" not in self._families:
            raise PolicyViolation(f"dtype {name}: torch is not available on the owner's side")
        try:
            return dtypes.resolve(name, "torch" if torch else "numpy")
        except KeyError:
            known = sorted([*dtypes.CANONICAL, *dtypes.ALIASES])
            raise PolicyViolation(_not_allowed(f"dtype {name}", known)) from None

    def precheck(self, op: Op) -> None:
        """Refuse what is wrong with ``op`` by names and argument kinds alone.

        The owner's kernel runs this before the op reaches the worker and reports a refusal
        to the researcher at once: it depends on nothing but what the researcher sent, so it
        carries no data. Everything else (the target's kind, aliasing, any error while
        running) is decided in the worker and stays opaque until a request is approved.
        """
        for key in op.kwargs:
            check_name(key, dotted=False)
        check_literals(op.name, op.args, op.kwargs)
        if op.kind == "function":
            check_name(op.name)
            if op.name not in self._functions:
                raise PolicyViolation(_not_allowed(op.name, list(self._functions)))
            fn = self._functions[op.name]  # a lazy one is not loaded in the owner's kernel
            if fn is None:
                if op.kwargs.get("out") is not None or op.kwargs.get("inplace"):
                    raise PolicyViolation(f"{op.name} with out/inplace is not allowed")
            else:
                try:
                    self.check_arguments(fn, tuple(op.args), op.kwargs, qualname=op.name)
                except TypeError:  # arguments that do not bind fail when the op runs
                    pass
        elif op.kind in ("method", "getattr"):
            check_name(op.name, dotted=False)
            table = self._methods if op.kind == "method" else self._attributes
            suffix = "." + op.name
            if not any(key.endswith(suffix) for key in table):
                kind = "method" if op.kind == "method" else "attribute"
                raise PolicyViolation(_not_allowed(
                    op.name, sorted({k.split(".", 1)[1] for k in table}),
                    f"an allowlisted {kind}"))
            if op.kwargs.get("out") is not None:
                raise PolicyViolation("out= writes into an existing object; use the result")
            if op.kwargs.get("inplace"):
                raise PolicyViolation("inplace=True is not allowed; use the result instead")
        for ref in _dtype_refs([*op.args, *op.kwargs.values()], 0):
            try:  # the flavor depends on the target's kind: either one will do here
                self.resolve_dtype(ref.name)
            except PolicyViolation:
                self.resolve_dtype(ref.name, torch=True)

    def family(self, obj: object) -> str | None:
        for family, cls in self._families.items():
            found = _family_class(cls, load=False)
            if found is not None and isinstance(obj, found):
                return family
        if isinstance(obj, np.generic):  # numpy scalars have the ndarray methods
            return "ndarray"
        return None

    def describe(self) -> AllowlistSummary:
        """What the researcher's side needs to refuse early (the owner still checks all)."""
        members: dict[str, list[str]] = {}
        for key in [*self._methods, *self._attributes]:
            family, name = key.split(".", 1)
            members.setdefault(family, []).append(name)
        return AllowlistSummary(
            functions=sorted(self._functions),
            members={family: sorted(names) for family, names in members.items()},
            attributes=sorted(self._attributes),
            mutating=sorted(k for k, m in self._methods.items() if m))

    def __contains__(self, qualname: object) -> bool:
        return qualname in self._functions or qualname in self._methods or (
            qualname in self._attributes
        )


def _family_class(cls: type | str, *, load: bool) -> type | None:
    """The class of a family; a lazy one only if its module is loaded (or ``load``)."""
    if isinstance(cls, type):
        return cls
    module_name, attribute = cls.split(":")
    module = sys.modules.get(module_name)
    if module is None:
        if not load:
            return None
        module = importlib.import_module(module_name)
    found = getattr(module, attribute)
    return found if isinstance(found, type) else None


# -- arguments: callables and names of functions ------------------------------------------
# Members and functions whose func/aggfunc argument pandas resolves by name.
_FUNCTION_TAKERS = frozenset({"agg", "aggregate", "transform", "apply", "map"})
_FUNCTION_KEYWORDS = ("func", "aggfunc", "arg")
_PANDAS_FUNCTION_TAKERS = frozenset({"pandas.pivot_table", "pandas.crosstab"})
_SAFE_ENGINES = (None, "c", "cython", "python")


def check_literals(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """What the researcher sent, by itself: names of functions pandas would look up, and
    settings that start processes or compile code. Used by ``precheck`` (in the owner's
    kernel, at once) and again in the worker."""
    short = name.rsplit(".", 1)[-1]
    if short in _FUNCTION_TAKERS or name in _PANDAS_FUNCTION_TAKERS:
        given = [kwargs[k] for k in _FUNCTION_KEYWORDS if k in kwargs]
        if args and short in _FUNCTION_TAKERS:
            given.append(args[0])
        given.extend(v[1] for k, v in kwargs.items()  # named aggregation: new=("col", "mean")
                     if k not in _FUNCTION_KEYWORDS and isinstance(v, tuple) and len(v) == 2)
        for value in given:
            _check_function_names(name, value, 0)
    if name.startswith("sklearn.") or short == "set_params":
        _check_sklearn_settings(kwargs)
    n_jobs = kwargs.get("n_jobs")
    if n_jobs is not None and n_jobs != 1:
        raise PolicyViolation("n_jobs must be 1 or None: the owner's worker runs one process")
    for key in ("engine", "engine_kwargs"):
        if kwargs.get(key) not in _SAFE_ENGINES:
            raise PolicyViolation(f"{key}={kwargs[key]!r} is not allowed (it compiles code)")


def _check_sklearn_settings(kwargs: Mapping[str, Any]) -> None:
    """Settings of scikit-learn that would work in place on the owner's data, write files,
    or evaluate an expression."""
    if kwargs.get("copy") is False:
        raise PolicyViolation("copy=False is not allowed: scikit-learn would then work in "
                              "place on its input, which may be the owner's data")
    if kwargs.get("memory") is not None:
        raise PolicyViolation("memory= is not allowed: it caches fitted steps in files")
    dispatch = kwargs.get("pre_dispatch", 0)
    if not isinstance(dispatch, int) and dispatch != "all":
        raise PolicyViolation("pre_dispatch must be a number or 'all', not an expression")


def _check_function_names(name: str, value: Any, depth: int) -> None:
    if name.rsplit(".", 1)[-1] == "map":  # Series.map(mapping): a dict or Series, no name
        if isinstance(value, str):
            raise PolicyViolation(f"{name} takes a mapping (a dict or Series), not a name")
        return
    if isinstance(value, str):
        if value not in FUNCTION_NAMES:
            close = difflib.get_close_matches(value, sorted(FUNCTION_NAMES), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PolicyViolation(
                f"{name}: {value!r} is not an allowlisted function name (pandas looks names up "
                f"and calls them); use one of {', '.join(sorted(FUNCTION_NAMES))}{hint}")
        return
    if depth > 2:
        raise PolicyViolation(f"{name}: function names are nested too deeply")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_function_names(name, item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _check_function_names(name, item, depth + 1)


_TABLE_PACKAGES = ("pandas", "sklearn")
_TABLE_FAMILIES = frozenset({"DataFrame", "Series", "Index", "GroupBy", "StringMethods",
                             "Datetimelike", "CategoricalAccessor", "Estimator"})


def check_values(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 allowlist: Allowlist) -> None:
    """Refuse callables among the resolved arguments of anything that involves pandas or
    scikit-learn: they call what they are given (``sort_values(key=)``, ``assign(c=f)``,
    ``loc[f]``, ``KNeighborsClassifier(metric=f)``), and the researcher's callable objects
    (torch modules) must not run there. Names of functions are checked as in
    ``check_literals``, now that pointers are resolved."""
    target = getattr(fn, "__self__", None)  # our own resolved, bound method
    module = getattr(fn, "__module__", None) or ""
    values = list(_walk([*args, *kwargs.values()]))
    tables = (module.split(".")[0] in _TABLE_PACKAGES
              or allowlist.family(target) in _TABLE_FAMILIES
              # any pandas object counts, indexers included: df.loc[f] calls f
              or any(type(v).__module__.split(".")[0] in _TABLE_PACKAGES for v in values))
    if not tables:
        return
    for value in values:
        if callable(value) and not isinstance(value, (np.ndarray, np.generic, np.dtype)):
            raise PolicyViolation(
                f"a {type(value).__name__} cannot be passed here: duet never hands callables "
                "to pandas or scikit-learn; use names of allowlisted functions instead")
    name = getattr(fn, "__name__", "")
    pandas = module.startswith("pandas") or (
        allowlist.family(target) in _TABLE_FAMILIES - {"Estimator"})
    if pandas and (name in _FUNCTION_TAKERS or f"pandas.{name}" in _PANDAS_FUNCTION_TAKERS):
        try:
            bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):  # arguments that do not bind: the call fails first
            bound = {}
        for key in _FUNCTION_KEYWORDS:
            if key in bound:
                _check_function_names(name, bound[key], 0)
        for value in dict(bound.get("kwargs") or {}).values():  # new=("column", "mean")
            if isinstance(value, tuple) and len(value) == 2:
                _check_function_names(name, value[1], 0)
    check_literals(name, [], dict(kwargs))
    if module.startswith("sklearn") or allowlist.family(target) == "Estimator":
        _check_sklearn_settings(kwargs)


def _walk(values: list[Any]) -> Iterable[Any]:
    stack = [(v, 0) for v in values]
    while stack:
        value, depth = stack.pop()
        yield value
        if depth < MAX_VALUE_DEPTH and type(value) in (list, tuple, dict):
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)


_LAZY_TABLE_NAMES = frozenset(
    f"{namespace}.{name}" for namespace, name in _words(FUNCTIONS)
    if namespace.split(".")[0] in _LAZY_PACKAGES)


def _dtype_refs(values: list[Any], depth: int) -> list[DTypeRef]:
    found: list[DTypeRef] = []
    if depth > 32:
        return found
    for value in values:
        if isinstance(value, DTypeRef):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_dtype_refs(list(value), depth + 1))
        elif isinstance(value, dict):
            found.extend(_dtype_refs(list(value.values()), depth + 1))
    return found


_NO_MEMBERS = "{name!r}: this kind of object has no allowlisted methods or attributes"


def _not_allowed(key: str, known: list[str], what: str = "on the owner's allowlist") -> str:
    message = f"{key} is not {what}"
    close = difflib.get_close_matches(key, known, n=3)
    return f"{message}; did you mean {', '.join(close)}?" if close else message


def _copy_hint(family: str, shared: bool | str) -> str:
    name = shared if isinstance(shared, str) else "x"
    if family in ("Module", "Optimizer"):
        return f"copy.deepcopy({name})"
    return f"{name}.clone()" if family == "Tensor" else f"{name}.copy()"


_FORBIDDEN: list[Any] = []
# Functions whose aliases elsewhere (e.g. ``numpy.lib.npyio.load``) must not be allowed either.
_FORBIDDEN_FUNCTIONS = (
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.open", "builtins.getattr",
    "builtins.setattr", "builtins.delattr", "builtins.__import__", "builtins.globals",
    "builtins.locals", "builtins.vars", "builtins.input", "builtins.breakpoint",
    "numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.memmap", "numpy.fromregex",
    "numpy.frombuffer", "numpy.frompyfunc", "numpy.vectorize", "torch.load", "torch.save",
    "torch.from_file",
)


def _forbidden_objects() -> list[Any]:
    if not _FORBIDDEN:
        for qualname in _FORBIDDEN_FUNCTIONS:
            try:
                _FORBIDDEN.append(_import_path(qualname))
            except (AttributeError, ImportError):  # torch absent
                continue
    return _FORBIDDEN


def check_described(described: AllowlistSummary, kind: str, name: str) -> None:
    """Researcher-side pre-check against the owner's ``describe()``, so a forbidden operation
    fails before it is sent, with close matches as suggestions.

    ``kind`` is ``"function"`` (qualified name), ``"method"`` or ``"attribute"``; for the
    latter two ``name`` is ``"family.name"`` or a bare name (allowed if any family has it).
    """
    if kind == "function":
        check_name(name)
        if name not in described.functions:
            raise PolicyViolation(_not_allowed(name, list(described.functions)))
        return
    if kind not in ("method", "attribute"):
        raise ValueError(f"unknown kind {kind!r}")
    check_name(name)
    attributes = set(described.attributes)
    candidates = {
        f"{family}.{member}"
        for family, members in described.members.items()
        for member in members
        if (f"{family}.{member}" in attributes) == (kind == "attribute")
    }
    known = candidates if "." in name else {c.split(".", 1)[1] for c in candidates}
    if name not in known:
        raise PolicyViolation(_not_allowed(name, sorted(known), f"an allowlisted {kind}"))

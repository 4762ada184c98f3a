"""The paper-exact Batch Normalization layer."""

from __future__ import annotations

import keras
from keras import backend, constraints, initializers, ops, regularizers
from keras.layers import InputSpec

from kerasbn.ops import dispatch
from kerasbn.ops.moments import moments, static_count
from kerasbn.ops.normalize import normalize

_RENORM_KEYS = ("rmax", "rmin", "dmax")


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNormalization(keras.layers.Layer):
    """Batch Normalization exactly as Ioffe & Szegedy (2015) define it.

    In training (Algorithm 1) each feature is normalized with the statistics
    of the current mini-batch, computed over every axis that is not a feature
    axis (for a convolutional feature map: over batch and spatial positions,
    the paper's rule for convolutional layers):

        μ_B = mean(x),  σ²_B = mean((x − μ_B)²),
        x̂ = (x − μ_B) / √(σ²_B + ε),  y = γ·x̂ + β.

    The moving statistics follow Algorithm 2: ``moving_variance`` tracks the
    unbiased estimate ``m/(m−1)·σ²_B`` (``m`` values reduced per feature),
    averaged either exponentially (``momentum``, Keras's convention
    ``new = momentum·old + (1 − momentum)·batch``) or, with
    ``momentum=None``, as the exact cumulative average over every training
    batch seen (the paper's ``E_B[·]``). In inference the layer is one fused
    multiply-add per element, ``y = (x − E[x])·a + β`` with
    ``a = γ/√(Var[x] + ε)``.

    This is a drop-in replacement for `keras.layers.BatchNormalization`: the
    constructor is a superset of Keras's, the weights have the same names and
    shapes, and ``unbiased=False`` reproduces Keras's statistics. The batch
    statistics are computed in one pass around the mean of a small sample
    of the data itself, so they are as accurate as a float32 two-pass
    computation at any offset, including large constant offsets where
    ``E[x²] − E[x]²`` in float32 fails (`kerasbn.ops.moments`).

    Note that the often-copied snippet ``(X − mean(X, axis=−1)) / (std +
    eps)`` normalizes each sample over its own features: that is layer
    normalization, not batch normalization.

    Args:
        axis: Integer or list of integers, the feature axis or axes. Every
            other axis is reduced. After a ``channels_first`` convolution use
            ``axis=1``.
        momentum: Float, momentum of the exponential moving average, or
            ``None`` for the exact cumulative average over all training
            batches (a per-feature batch counter is kept as a weight).
        epsilon: Small float added to the variance inside the square root.
        center: If ``True``, add the learned offset ``beta``.
        scale: If ``True``, multiply by the learned scale ``gamma``.
        beta_initializer: Initializer for ``beta``.
        gamma_initializer: Initializer for ``gamma``.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for ``beta``.
        gamma_regularizer: Optional regularizer for ``gamma``.
        beta_constraint: Optional constraint for ``beta``.
        gamma_constraint: Optional constraint for ``gamma``.
        renorm: Whether to use Batch Renormalization (Ioffe, 2017), with the
            same weights and corrections as Keras's layer.
        renorm_clipping: Dict with optional keys ``"rmax"``, ``"rmin"``,
            ``"dmax"`` clipping the renorm corrections.
        renorm_momentum: Momentum of the renorm moving statistics.
        synchronized: If ``True``, the batch statistics are those of the
            global batch across all replicas of a `tf.distribute` strategy.
            Under `keras.distribution` on JAX the statistics are always
            global, since the step is compiled over the global batch.
        unbiased: If ``True`` (the paper), the moving variance accumulates
            ``m/(m−1)·σ²_B``; if ``False``, the biased ``σ²_B`` as Keras does.
        virtual_batch_size: Optional int. Ghost batch normalization: the batch
            is split into groups of this size, each normalized with its own
            statistics; the moving statistics average the groups'. The batch
            size must be a multiple of it.
        **kwargs: Base layer keyword arguments (e.g. ``name`` and ``dtype``).

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean. ``True`` normalizes with the batch
            statistics and updates the moving ones; ``False`` (the default)
            uses the moving statistics. A layer with ``trainable=False``
            always runs in inference mode, as in Keras.
        mask: Optional boolean tensor of rank ``rank(inputs) − 1``; masked
            positions do not enter the batch statistics.

    In training the gradient is the paper's closed form rather than autodiff
    (`kerasbn.ops.normalize`): TensorFlow's fused CPU kernels in a graph or
    eagerly, plain ops that XLA fuses under `jit_compile=True` and on JAX.
    Masked batches and renorm keep autodiff.

    float16/bfloat16 inputs are normalized with float32 statistics and the
    output is cast back to the layer's compute dtype; the moving statistics
    are stored in at least float32 whatever the dtype policy, since the
    variance of float16 data can exceed float16's range.

    A training batch with a single value per feature (``m = 1``) carries no
    variance: when ``m`` is known when the layer is traced this is an error;
    when it is only known at run time, the moving statistics are left
    unchanged for that batch (never NaN) and the output is ``beta``.

    Examples:
        >>> import numpy as np, keras, kerasbn
        >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype="float32")
        >>> bn = kerasbn.BatchNormalization(momentum=None, epsilon=0.0)
        >>> np.round(keras.ops.convert_to_numpy(bn(x, training=True)), 4).tolist()
        [[-1.0, -1.0], [1.0, 1.0]]
        >>> keras.ops.convert_to_numpy(bn.moving_variance).tolist()  # unbiased: 2/1 · σ²_B
        [2.0, 200.0]

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) (renorm).
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741)
          (virtual batches).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        unbiased=True,
        virtual_batch_size=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)):
            if not axis:
                raise ValueError("`axis` must name at least one axis.")
            self.axis = [int(a) for a in axis]
        else:
            self.axis = int(axis)
        self.momentum = None if momentum is None else float(momentum)
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1] or None. Received: {momentum}")
        self.epsilon = float(epsilon)
        if self.epsilon < 0:
            raise ValueError(f"`epsilon` must be non-negative. Received: {epsilon}")
        self.center = center
        self.scale = scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        self.renorm_clipping = _check_renorm_clipping(renorm_clipping) if renorm else renorm_clipping
        self.renorm_momentum = float(renorm_momentum)
        self.synchronized = bool(synchronized)
        self.unbiased = bool(unbiased)
        if virtual_batch_size is not None:
            virtual_batch_size = int(virtual_batch_size)
            if virtual_batch_size < 1:
                raise ValueError(f"`virtual_batch_size` must be a positive integer. Received: {virtual_batch_size}")
        self.virtual_batch_size = virtual_batch_size
        if self.renorm and self.momentum is None:
            raise ValueError("`renorm=True` needs a float `momentum`; the cumulative average is not defined for it.")
        if self.renorm and virtual_batch_size is not None:
            raise ValueError("`renorm=True` cannot be combined with `virtual_batch_size`.")
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.moving_count = None

    def build(self, input_shape):
        ndim = len(input_shape)
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"Axis {a} is out of bounds for input shape {tuple(input_shape)}.")
        self._axes = sorted({a % ndim for a in axes})
        if len(self._axes) != len(axes):
            raise ValueError(f"`axis` names the same axis twice: {self.axis}.")
        if any(input_shape[a] is None for a in self._axes):
            raise ValueError(f"The feature axes {self._axes} of input shape {tuple(input_shape)} must be known.")
        if self.virtual_batch_size is not None:
            if 0 in self._axes:
                raise ValueError("`virtual_batch_size` needs the batch axis 0 to be reduced, not a feature axis.")
            batch = input_shape[0]
            if batch is not None and batch % self.virtual_batch_size:
                raise ValueError(
                    f"The batch size {batch} is not a multiple of virtual_batch_size={self.virtual_batch_size}."
                )
        self._reduction_axes = [a for a in range(ndim) if a not in self._axes]
        self._param_shape = tuple(input_shape[a] for a in self._axes)
        self._broadcast_shape = tuple(input_shape[a] if a in self._axes else 1 for a in range(ndim))

        if self.scale:
            self.gamma = self._param(
                "gamma", self.gamma_initializer, True, self.gamma_regularizer, self.gamma_constraint
            )
        if self.center:
            self.beta = self._param("beta", self.beta_initializer, True, self.beta_regularizer, self.beta_constraint)
        self.moving_mean = self._param("moving_mean", self.moving_mean_initializer, False)
        self.moving_variance = self._param("moving_variance", self.moving_variance_initializer, False)
        if self.momentum is None:
            self.moving_count = self._param("moving_count", "zeros", False)
        if self.renorm:
            variance_init = self.moving_variance_initializer

            def stddev_init(shape, dtype=None):
                return ops.sqrt(_clone(variance_init)(shape, dtype=dtype))

            self.moving_stddev = self._param("moving_stddev", stddev_init, False)
            self.renorm_mean = self._param("renorm_mean", _clone(self.moving_mean_initializer), False)
            self.renorm_stddev = self._param("renorm_stddev", stddev_init, False)
        self.input_spec = InputSpec(ndim=ndim, axes={a: input_shape[a] for a in self._axes})
        # The backend's arrangements imported now, outside any torch.compile trace.
        dispatch.module()

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. "
                f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        # The calls made on every step go through the backend's own array
        # functions where Keras's dispatch costs more than the op (torch).
        fast = dispatch.array_ops()
        # Statistics of float16/bfloat16 data overflow and lose precision:
        # compute in float32 (or wider) and cast back once at the end.
        x = fast.cast(inputs, backend.result_type(inputs.dtype, "float32"))
        if training and self.trainable:
            outputs = self._train(inputs, x, mask)
        else:
            outputs = self._infer(inputs, x)
        return fast.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        ndim = len(input_shape)
        for a in self.axis if isinstance(self.axis, list) else [self.axis]:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"Axis {a} is out of bounds for input shape {tuple(input_shape)}. Received: axis={self.axis}"
                )
        return input_shape

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "synchronized": self.synchronized,
            "unbiased": self.unbiased,
            "virtual_batch_size": self.virtual_batch_size,
        }
        return {**super().get_config(), **config}

    def _param(self, name, initializer, trainable, regularizer=None, constraint=None):
        # A float16 moving variance overflows for float16 data beyond ~256:
        # the statistics are stored in at least float32 whatever the policy.
        dtype = self.variable_dtype if trainable else backend.result_type(self.variable_dtype, "float32")
        return self.add_weight(
            shape=self._param_shape,
            name=name,
            initializer=initializer,
            regularizer=regularizer,
            constraint=constraint,
            trainable=trainable,
            autocast=False,
            dtype=dtype,
        )

    def _bcast(self, v, dtype):
        fast = dispatch.array_ops()
        return fast.reshape(fast.cast(v, dtype), self._broadcast_shape)

    def _affine(self, dtype):
        gamma = self._bcast(self.gamma, dtype) if self.scale else None
        beta = self._bcast(self.beta, dtype) if self.center else None
        return gamma, beta

    def _infer(self, inputs, x):
        gamma, beta = self._affine(x.dtype)
        # Half-precision inputs that stay half precision go straight into
        # the fused kernel, which computes in float32 inside: no cast passes.
        dtype = backend.standardize_dtype(inputs.dtype)
        raw = inputs if dtype in ("float16", "bfloat16") and dtype == self.compute_dtype else x
        if dispatch.fused_available(raw, self._axes, synchronized=False):
            # One kernel instead of TensorFlow's three elementwise passes;
            # it subtracts the mean first, like the form below.
            mean = self._bcast(self.moving_mean, "float32")
            variance = self._bcast(self.moving_variance, "float32")
            return dispatch.fused_inference(raw, mean, variance, gamma, beta, self.epsilon)
        a = ops.rsqrt(self._bcast(self.moving_variance, x.dtype) + self.epsilon)
        if gamma is not None:
            a = a * gamma
        mean = self._bcast(self.moving_mean, x.dtype)
        if raw is not x:
            # Half-precision data: x·a + (β − E[x]·a). The product rounds at
            # 2⁻²⁴ of the offset, far below the data's own spacing (2⁻⁸ of it
            # in bfloat16), and one per-feature vector fewer per element keeps
            # XLA:CPU's loop closer to a copy.
            b = -mean * a if beta is None else beta - mean * a
            return x * a + b
        # (x − E[x])·a + β rather than x·a + b: with |E[x]| ≫ std the product
        # x·a rounds at the scale of the offset; the difference is exact.
        y = (x - mean) * a
        return y if beta is None else y + beta

    def _train(self, inputs, x, mask):
        axes = self._reduction_axes
        shape = None
        if self.virtual_batch_size is not None:
            shape = ops.shape(x)
            x, mask = self._to_ghost_batches(x, mask)
            axes = [1] + [a + 1 for a in axes[1:]]
        m = static_count(x.shape, axes)
        if self.unbiased and mask is None and m == 1:
            raise ValueError(
                f"BatchNormalization in training needs more than one value per feature "
                f"to estimate a variance; input shape {tuple(x.shape)} gives m=1."
            )
        if mask is not None:
            mask = ops.expand_dims(mask, -1)
        # The count per feature where it is this static number (no mask, no other replicas' values).
        local = m if mask is None and not self.synchronized else None
        # The paper's closed-form gradient (kerasbn.ops.normalize) takes the
        # statistics as constants: computed from x without a gradient, no
        # backend records their passes for autodiff (torch eagerly did).
        # Masks and renorm are rare and keep autodiff: a masked position
        # still receives β and γ·x̂ but not a share of the statistics, and
        # renorm's corrections change x̂'s gradient.
        closed = mask is None and not self.renorm
        stats = moments(ops.stop_gradient(x) if closed else x, axes, mask=mask, synchronized=self.synchronized)
        gamma, beta = self._affine(x.dtype)
        if self.virtual_batch_size is not None:
            gamma = None if gamma is None else ops.expand_dims(gamma, 0)
            beta = None if beta is None else ops.expand_dims(beta, 0)
        if closed:
            # Half-precision inputs enter as they are: the residual kept for
            # the backward pass is half the size of a float32 copy, and the
            # fused kernels read and write half precision themselves.
            raw = inputs if shape is None else x
            if shape is None and dispatch.fused_available(raw, self._axes, self.synchronized):
                y = dispatch.fused_normalize(raw, stats, gamma, beta, self.epsilon)
            else:
                y = normalize(raw, stats, gamma, beta, self.epsilon, axes, self.synchronized)
            self._update_moving_statistics(stats, local)
            return y if shape is None else ops.reshape(y, shape)
        if self.renorm:
            gamma, beta = self._renorm_transform(stats, gamma, beta)
        inv = ops.rsqrt(stats.variance + self.epsilon)
        a = inv if gamma is None else inv * gamma
        y = ((x - stats.shift) - stats.delta) * a
        if beta is not None:
            y = y + beta
        self._update_moving_statistics(stats, local)
        if shape is not None:
            y = ops.reshape(y, shape)
        return y

    def _to_ghost_batches(self, x, mask):
        v = self.virtual_batch_size
        rest = [d if d is not None else ops.shape(x)[i + 1] for i, d in enumerate(x.shape[1:])]
        x = ops.reshape(x, [-1, v] + rest)
        if mask is not None:
            mask = ops.reshape(mask, [-1, v] + rest[: len(mask.shape) - 1])
        return x, mask

    def _param_view(self, stat):
        """A keepdims statistic reshaped to the weights' shape."""
        fast = dispatch.array_ops()
        if self.virtual_batch_size is not None:
            stat = fast.mean(stat, axis=0)
        return fast.reshape(stat, self._param_shape)

    def _update_moving_statistics(self, stats, m):
        """``m``: the values per feature, where known at trace time and the same for every feature."""
        dtype = stats.variance.dtype
        mean = self._param_view(stats.mean)
        variance = stats.variance
        valid = None
        if self.unbiased and m is not None:
            # A Python factor: no per-call ops (each costs ~20 µs eagerly on torch).
            variance = variance * (m / (m - 1.0))
        elif self.unbiased:
            # m/(m−1) is undefined for m ≤ 1: such a batch (known only at run
            # time) leaves the moving statistics as they are.
            count = stats.count * ops.ones_like(stats.variance)
            variance = variance * count / ops.maximum(count - 1.0, 1.0)
            valid = self._param_view(ops.cast(count > 1.0, dtype)) > 0.5
        variance = self._param_view(variance)
        if self.renorm:
            self._update_renorm_statistics(mean, variance, valid)
            return
        fast = dispatch.array_ops()
        moving_mean = fast.cast(self.moving_mean, dtype)
        moving_variance = fast.cast(self.moving_variance, dtype)
        if self.momentum is None:
            n = fast.cast(self.moving_count, dtype)
            step = 1.0 / (n + 1.0)
            new_mean = moving_mean + (mean - moving_mean) * step
            new_variance = moving_variance + (variance - moving_variance) * step
            self._assign(self.moving_count, n + 1.0, n, valid)
        else:
            new_mean = moving_mean * self.momentum + mean * (1.0 - self.momentum)
            new_variance = moving_variance * self.momentum + variance * (1.0 - self.momentum)
        self._assign(self.moving_mean, new_mean, moving_mean, valid)
        self._assign(self.moving_variance, new_variance, moving_variance, valid)

    @staticmethod
    def _assign(variable, new, old, valid):
        if valid is not None:
            new = ops.where(valid, new, old)
        variable.assign(dispatch.array_ops().cast(new, variable.dtype))

    def _renorm_transform(self, stats, gamma, beta):
        """Batch Renormalization: ``x̂·r + d`` folded into γ and β."""
        dtype = stats.variance.dtype
        stddev = ops.sqrt(stats.variance + self.epsilon)
        renorm_mean = self._bcast(self.renorm_mean, dtype)
        renorm_stddev = ops.maximum(self._bcast(self.renorm_stddev, dtype), ops.sqrt(ops.cast(self.epsilon, dtype)))
        r = stddev / renorm_stddev
        d = (stats.mean - renorm_mean) / renorm_stddev
        clip = self.renorm_clipping
        if clip.get("rmin") is not None:
            r = ops.maximum(r, clip["rmin"])
        if clip.get("rmax") is not None:
            r = ops.minimum(r, clip["rmax"])
        if clip.get("dmax") is not None:
            d = ops.clip(d, -clip["dmax"], clip["dmax"])
        r = ops.stop_gradient(r)
        d = ops.stop_gradient(d)
        if gamma is None:
            return r, d if beta is None else d + beta
        return r * gamma, d * gamma if beta is None else d * gamma + beta

    def _update_renorm_statistics(self, mean, variance, valid):
        dtype = variance.dtype
        stddev = ops.sqrt(variance + self.epsilon)
        renorm_mean = ops.cast(self.renorm_mean, dtype)
        renorm_stddev = ops.cast(self.renorm_stddev, dtype)
        moving_mean = ops.cast(self.moving_mean, dtype)
        moving_stddev = ops.cast(self.moving_stddev, dtype)
        moving_variance = ops.cast(self.moving_variance, dtype)
        rm, m = self.renorm_momentum, self.momentum
        new_stddev = moving_stddev * m + stddev * (1.0 - m)
        self._assign(self.renorm_mean, renorm_mean * rm + mean * (1.0 - rm), renorm_mean, valid)
        self._assign(self.renorm_stddev, renorm_stddev * rm + stddev * (1.0 - rm), renorm_stddev, valid)
        self._assign(self.moving_mean, moving_mean * m + mean * (1.0 - m), moving_mean, valid)
        self._assign(self.moving_stddev, new_stddev, moving_stddev, valid)
        # The inference variance is derived from the tracked stddev, clamped
        # in case rounding takes it below ε.
        self._assign(self.moving_variance, ops.relu(new_stddev * new_stddev - self.epsilon), moving_variance, valid)


def _check_renorm_clipping(clipping):
    clipping = dict(clipping or {})
    unknown = set(clipping) - set(_RENORM_KEYS)
    if unknown:
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {clipping}. Supported values: {list(_RENORM_KEYS)}."
        )
    rmax, rmin, dmax = (clipping.get(k) for k in _RENORM_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(f"rmax should be greater than rmin in `renorm_clipping`. Received: rmax={rmax}, rmin={rmin}.")
    if dmax is not None and dmax < 0:
        raise ValueError(f"dmax should be non-negative in `renorm_clipping`. Received: dmax={dmax}.")
    return clipping


def _clone(initializer):
    """A fresh copy of a seeded initializer, so two weights don't share draws."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer

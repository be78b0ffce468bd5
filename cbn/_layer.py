"""``cbn.BatchNorm``: the layer, with PyTorch's state and update rules."""
import operator

import numpy as np

from . import _args
from ._api import _on_gpu, batch_norm, batch_norm_backward, batch_norm_forward
from .reference import activation_derivative


class BatchNorm:
    """Batch normalization layer over the channel axis (or axes) of its input.

    Parameters
    ----------
    num_features : int or tuple of ints
        Channels: ``x.shape[channel_axis]`` (a tuple for a tuple of axes).
    channel_axis : int or tuple of ints, default 1
        As in :func:`cbn.batch_norm`.
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of each batch in the running statistics; None for the
        cumulative moving average (1 / number of batches seen), as PyTorch.
    affine : bool, default True
        Learn ``weight`` (gamma, ones) and ``bias`` (beta, zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``;
        in eval mode normalize with them.  Without them, batch statistics are
        used in both modes.
    activation : {None, "relu", "leaky_relu", "sigmoid", "tanh"}, optional
        Applied to the output in the same pass (see :func:`cbn.batch_norm`).
    negative_slope : float, default 0.01
        Slope of ``"leaky_relu"`` for negative inputs.
    dtype : dtype, default float32
        dtype of the parameters and running statistics.

    Attributes
    ----------
    weight, bias : ndarray or None
    running_mean, running_var : ndarray or None
    num_batches_tracked : int
    grad_weight, grad_bias : ndarray or None
        Set by :meth:`backward`.
    training : bool

    Examples
    --------
    >>> import numpy as np, cbn
    >>> layer = cbn.BatchNorm(4)
    >>> x = np.random.default_rng(0).normal(size=(8, 4, 5, 5)).astype(np.float32)
    >>> y = layer(x)                       # training: batch statistics
    >>> dx = layer.backward(np.ones_like(y))
    >>> layer.grad_bias.tolist()
    [200.0, 200.0, 200.0, 200.0]
    >>> y_eval = layer.eval()(x)           # running statistics
    >>> sorted(layer.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    def __init__(
        self,
        num_features,
        *,
        channel_axis=1,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        activation=None,
        negative_slope=0.01,
        dtype=np.float32,
    ):
        self.channel_shape = _feature_shape(num_features)
        if isinstance(channel_axis, tuple) != isinstance(num_features, tuple) or (
            isinstance(channel_axis, tuple) and len(channel_axis) != len(self.channel_shape)
        ):
            raise ValueError(f"num_features {num_features!r} does not match channel_axis {channel_axis!r}")
        self.channel_axis = channel_axis
        self.eps = _args.scalar(eps, "eps", 0.0, np.inf)
        self.momentum = None if momentum is None else _args.scalar(momentum, "momentum", 0.0, 1.0)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f" or self.dtype.itemsize > 8:
            raise TypeError(f"dtype must be float16, float32 or float64, got {self.dtype}")
        _args.activation(activation, negative_slope)  # checked here, used by the functions
        self.activation = activation
        self.negative_slope = negative_slope
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.weight = np.ones(self.channel_shape, self.dtype) if affine else None
        self.bias = np.zeros(self.channel_shape, self.dtype) if affine else None
        self.running_mean = np.zeros(self.channel_shape, self.dtype) if track_running_stats else None
        self.running_var = np.ones(self.channel_shape, self.dtype) if track_running_stats else None
        self.num_batches_tracked = 0
        self.grad_weight = None
        self.grad_bias = None
        self.training = True
        self._saved = None  # what backward needs from the last forward

    def __repr__(self):
        return (
            f"BatchNorm({self.channel_shape if len(self.channel_shape) > 1 else self.channel_shape[0]}, "
            f"channel_axis={self.channel_axis}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, activation={self.activation!r}, dtype={self.dtype.name})"
        )

    # -- modes ------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (running statistics, when tracked); returns self."""
        return self.train(False)

    # -- forward and backward ---------------------------------------------

    def forward(self, x):
        """Normalize ``x``; remember what :meth:`backward` needs.

        The parameters and running statistics follow the input: a CuPy ``x``
        moves them to the GPU (once), a NumPy one back to the host.
        """
        xp = _module_of(x)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(self, name, _to_module(getattr(self, name), xp))
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            momentum = 0.0
            running = {}
            batches = self.num_batches_tracked
            if self.training and self.track_running_stats:
                batches += 1
                momentum = 1.0 / batches if self.momentum is None else self.momentum
                running = dict(running_mean=self.running_mean, running_var=self.running_var)
            y, mean, invstd = self._forward_batch(x, momentum, running)
            self.num_batches_tracked = batches  # only once the batch went through
        else:
            y = batch_norm(
                x, self.weight, self.bias, running_mean=self.running_mean, running_var=self.running_var,
                training=False, eps=self.eps, channel_axis=self.channel_axis, activation=self.activation,
                negative_slope=self.negative_slope,
            )
            mean = self.running_mean.astype(np.float64)
            with np.errstate(divide="ignore"):
                invstd = 1.0 / xp.sqrt(self.running_var.astype(np.float64) + self.eps)
        self._saved = (x, mean, invstd, use_batch_stats)
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient with respect to the last forward's input; sets ``grad_weight``, ``grad_bias``.

        After a training-mode forward the batch statistics depend on x (the
        full batch-norm gradient); after an eval-mode forward the running
        statistics are constants.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        x, mean, invstd, used_batch_stats = self._saved
        if used_batch_stats:
            dx, dgamma, dbeta = self._backward_batch(dy, x, mean, invstd)
        else:
            dx, dgamma, dbeta = _eval_backward(
                dy, x, mean, invstd, self.weight, self.bias, self.activation, self.negative_slope, self.channel_axis
            )
        if self.affine:
            self.grad_weight = dgamma.astype(self.dtype)
            self.grad_bias = dbeta.astype(self.dtype)
        return dx

    def _forward_batch(self, x, momentum, running):
        """(y, mean, invstd) normalized with x's statistics (float64), running ones updated."""
        xp = _module_of(x)
        mean, invstd = xp.empty(self.channel_shape), xp.empty(self.channel_shape)
        y, _, _ = batch_norm_forward(
            x, self.weight, self.bias, momentum=momentum, eps=self.eps, channel_axis=self.channel_axis,
            activation=self.activation, negative_slope=self.negative_slope, out=(None, mean, invstd), **running,
        )
        return y, mean, invstd

    def _backward_batch(self, dy, x, mean, invstd):
        """(dx, dgamma, dbeta) of a forward that used the batch statistics."""
        return batch_norm_backward(
            dy, x, mean, invstd, self.weight, self.bias, activation=self.activation,
            negative_slope=self.negative_slope, channel_axis=self.channel_axis,
        )

    # -- state ------------------------------------------------------------

    def state_dict(self):
        """Copies of the state, under PyTorch's ``BatchNorm`` key names."""
        state = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state):
        """Load a state saved by :meth:`state_dict`, or PyTorch's (as arrays)."""
        expected = set(self.state_dict())
        given = set(state)
        if given != expected:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            raise KeyError(f"state keys do not match: missing {missing}, unexpected {unexpected}")
        for name in ("weight", "bias", "running_mean", "running_var"):
            if name in state:
                current = getattr(self, name)  # the loaded value stays where the layer's arrays are
                xp = _module_of(current)
                value = state[name] if isinstance(state[name], xp.ndarray) else _to_module(state[name], xp)
                if value.shape != self.channel_shape:
                    raise ValueError(f"{name} must have shape {self.channel_shape}, got {value.shape}")
                setattr(self, name, value.astype(self.dtype, copy=True))
        if "num_batches_tracked" in state:
            self.num_batches_tracked = int(state["num_batches_tracked"])
        return self


def _module_of(array):
    """cupy for a CuPy array (imported only then), numpy otherwise."""
    if _on_gpu(array):
        import cupy

        return cupy
    return np


def _to_module(value, xp):
    """``value`` (None, array_like, NumPy or CuPy array) as an array of module ``xp``."""
    if value is None or type(value) is xp.ndarray:
        return value
    if xp is np:
        return value.get() if _on_gpu(value) else np.asarray(value)
    return xp.asarray(value)


def _feature_shape(num_features):
    values = num_features if isinstance(num_features, tuple) else (num_features,)
    try:
        shape = tuple(operator.index(n) for n in values)
    except TypeError:
        raise TypeError(f"num_features must be an int or a tuple of ints, got {num_features!r}") from None
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"num_features must be positive, got {num_features!r}")
    return shape


def _broadcaster(ndim, axes, cshape):
    """Reshape per-channel arrays (in channel_axis order) to broadcast against an ndim array."""
    order = np.argsort(axes)
    shape = [1] * ndim
    for a, n in zip(axes, cshape):
        shape[a] = n
    return lambda values: np.transpose(values, order).reshape(shape)


def _eval_backward(dy, x, mean, invstd, weight, bias, activation, negative_slope, channel_axis):
    """Gradient of y = act((x - mean) * invstd * weight + bias) with mean and invstd constant."""
    xp = _module_of(x)
    dy, x = xp.asarray(dy), xp.asarray(x)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of the forward's input {x.shape}, got {dy.shape}")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    per_channel = _broadcaster(x.ndim, axes, cshape)
    reduced = tuple(i for i in range(x.ndim) if i not in axes)
    back_to_given_order = np.argsort(np.argsort(axes))
    gamma = xp.ones(cshape) if weight is None else weight.astype(np.float64)
    beta = xp.zeros(cshape) if bias is None else bias.astype(np.float64)
    xhat = (x.astype(np.float64) - per_channel(mean)) * per_channel(invstd)
    g = dy.astype(np.float64)
    if activation is not None:  # through the activation, at the recomputed pre-activation
        g = g * activation_derivative(per_channel(gamma) * xhat + per_channel(beta), activation, negative_slope)
    dgamma = np.transpose(np.sum(g * xhat, axis=reduced), back_to_given_order)
    dbeta = np.transpose(np.sum(g, axis=reduced), back_to_given_order)
    dx = (g * per_channel(gamma * invstd)).astype(_args.result_dtype(dy, x))
    return dx, dgamma, dbeta

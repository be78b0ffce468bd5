"""Bad input raises TypeError/ValueError naming the argument, before any work."""
import numpy as np
import pytest

import cbn
from cbn import reference

X = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
C3 = np.ones(3, np.float32)


def _stats():
    return cbn.batch_norm_forward(X)[1:]


BAD_CALLS = [
    # x
    (lambda f: f.batch_norm(X.astype(np.complex64)), TypeError, "x has complex"),
    (lambda f: f.batch_norm(np.array([["a", "b"], ["c", "d"]])), TypeError, "x has string"),
    (lambda f: f.batch_norm(np.array([[object(), 1]], dtype=object)), TypeError, "x has object"),
    (lambda f: f.batch_norm([[1.0, 2.0], [3.0]]), TypeError, "x could not be converted"),
    (lambda f: f.batch_norm(np.zeros((4, 3), dtype=[("a", "f4")])), TypeError, "x has structured"),
    (lambda f: f.batch_norm(np.zeros((4, 3), dtype="M8[s]")), TypeError, "x has datetime"),
    (lambda f: f.batch_norm(np.ones(5)), ValueError, "at least 2 dimensions"),
    (lambda f: f.batch_norm(np.float32(3.0)), ValueError, "at least 2 dimensions"),
    (lambda f: f.batch_norm(np.ones((1, 3))), ValueError, "more than 1 value per channel"),
    (lambda f: f.batch_norm(np.ones((1, 3, 1))), ValueError, "more than 1 value per channel"),
    (lambda f: f.batch_norm(np.ones((0, 3))), ValueError, "more than 1 value per channel"),
    (lambda f: f.batch_norm_forward(np.ones((1, 3))), ValueError, "more than 1 value per channel"),
    # channel_axis
    (lambda f: f.batch_norm(X, channel_axis=3), ValueError, "channel_axis 3 is out of bounds"),
    (lambda f: f.batch_norm(X, channel_axis=-4), ValueError, "channel_axis -4 is out of bounds"),
    (lambda f: f.batch_norm(X, channel_axis=(1, -2)), ValueError, "repeats an axis"),
    (lambda f: f.batch_norm(X, channel_axis=()), ValueError, "at least one axis"),
    (lambda f: f.batch_norm(X, channel_axis=1.0), TypeError, "channel_axis must be an int"),
    (lambda f: f.batch_stats(X, channel_axis="1"), TypeError, "channel_axis must be an int"),
    # per-channel arguments
    (lambda f: f.batch_norm(X, np.ones(4)), ValueError, r"gamma must have shape \(3,\)"),
    (lambda f: f.batch_norm(X, None, np.ones((3, 1))), ValueError, r"beta must have shape \(3,\)"),
    (lambda f: f.batch_norm(X, 2.0), ValueError, "gamma must have shape"),
    (lambda f: f.batch_norm(X, C3 + 1j), TypeError, "gamma has complex"),
    (lambda f: f.batch_norm(X, running_mean=np.zeros(3)), ValueError, "must be given together"),
    (lambda f: f.batch_norm(X, running_mean=[0, 0, 0], running_var=np.ones(3)), TypeError, "running_mean must be a numpy.ndarray"),
    (lambda f: f.batch_norm(X, running_mean=np.zeros(3, int), running_var=np.ones(3)), TypeError, "running_mean must have a float"),
    (lambda f: f.batch_norm(X, running_mean=np.zeros(2), running_var=np.ones(2)), ValueError, r"running_mean must have shape \(3,\)"),
    (lambda f: f.batch_norm(X, running_mean=np.zeros(3), running_var=np.ones(2)), ValueError, "running_var must have shape"),
    (lambda f: f.batch_norm(X, training=False), ValueError, "required when training=False"),
    (lambda f: f.batch_norm(X, training=False, running_mean=np.zeros(3), running_var=np.ones(4)), ValueError, "running_var must have shape"),
    # scalars
    (lambda f: f.batch_norm(X, eps=-1e-5), ValueError, "eps must be"),
    (lambda f: f.batch_norm(X, eps=np.nan), ValueError, "eps must be"),
    (lambda f: f.batch_norm(X, eps=np.inf), ValueError, "eps must be"),
    (lambda f: f.batch_norm(X, eps="small"), TypeError, "eps must be a real number"),
    (lambda f: f.batch_norm(X, momentum=1.5), ValueError, "momentum must be"),
    (lambda f: f.batch_norm(X, momentum=None), TypeError, "momentum must be a real number"),
    # out
    (lambda f: f.batch_norm(X, out=np.empty((4, 3))), ValueError, r"out must have shape \(4, 3, 2\)"),
    (lambda f: f.batch_norm(X, out=np.empty((4, 3, 2), np.int32)), TypeError, "cannot hold the float32 result"),
    (lambda f: f.batch_norm(X, out=np.empty((4, 3, 2), np.float16)), None, None),  # same_kind: allowed
    (lambda f: f.batch_norm(X, out=[1, 2]), TypeError, "must be a numpy.ndarray"),
    (lambda f: f.batch_norm(X, out=(None, None)), ValueError, "out must have 1 entries"),
    (lambda f: f.batch_norm_forward(X, out=np.empty_like(X)), TypeError, "out must be a tuple of 3"),
    (lambda f: f.batch_norm_forward(X, out=(None, np.empty(2), None)), ValueError, r"out\[1\] \(mean\) must have shape"),
    (lambda f: f.batch_norm_forward(X, out=(None, None, np.empty(3, int))), TypeError, r"out\[2\] \(invstd\) has dtype int"),
    # backward
    (lambda f: f.batch_norm_backward(X[:2], X, *_stats()), ValueError, "dy and x must have the same shape"),
    (lambda f: f.batch_norm_backward(X, X, np.zeros(2), np.ones(3)), ValueError, "mean must have shape"),
    (lambda f: f.batch_norm_backward(X, X, np.zeros(3), np.ones(2)), ValueError, "invstd must have shape"),
    (lambda f: f.batch_norm_backward(X, X, *_stats(), np.ones(4)), ValueError, "gamma must have shape"),
    (lambda f: f.batch_norm_backward(X.astype(complex), X, *_stats()), TypeError, "dy has complex"),
    (lambda f: f.batch_norm_backward(X, X, *_stats(), out=(np.empty((4, 3)), None, None)), ValueError, r"out\[0\] \(dx\) must have shape"),
    (lambda f: f.batch_norm_backward(X, X, *_stats(), out=(None, np.empty(3, np.int8), None)), TypeError, r"out\[1\] \(dgamma\) has dtype int8"),
    # batch_stats
    (lambda f: f.batch_stats(np.ones((0, 3))), ValueError, "no values per channel"),
    (lambda f: f.batch_stats(np.float64(1.0)), ValueError, "at least 1 dimension"),
]


@pytest.mark.parametrize("module", [cbn, reference], ids=["cbn", "reference"])
@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_input_raises_a_clear_error(module, call, error, match):
    if error is None:
        call(module)
        return
    with pytest.raises(error, match=match):
        call(module)


def test_read_only_out_and_running_stats_are_rejected():
    out = np.empty_like(X)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        cbn.batch_norm(X, out=out)
    rm, rv = np.zeros(3), np.ones(3)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        cbn.batch_norm(X, running_mean=rm, running_var=rv)


def test_failed_call_leaves_every_array_untouched():
    x = X.copy()
    rm, rv = np.zeros(3), np.ones(3)
    out = np.full_like(X, 7.0)
    with pytest.raises(ValueError):
        cbn.batch_norm(x, np.ones(3), np.ones(4), running_mean=rm, running_var=rv, out=out)
    with pytest.raises(ValueError):
        cbn.batch_norm(x, running_mean=rm, running_var=rv, eps=-1.0, out=out)
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    np.testing.assert_array_equal(out, 7.0)


def test_training_is_allowed_with_one_value_per_channel_at_inference():
    y = cbn.batch_norm(np.ones((1, 3)), running_mean=np.zeros(3), running_var=np.ones(3), training=False)
    np.testing.assert_allclose(y, 1 / np.sqrt(1 + 1e-5))

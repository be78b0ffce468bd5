"""cbn.dask: lazy batch norm of Dask arrays against cbn's NumPy results, on several schedulers."""
import doctest

import numpy as np
import pytest
from helpers import random_array

import cbn
from cbn import reference

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
import cbn.dask  # noqa: E402  (needs dask)

CASES = [  # shape, channel_axis, chunks (every axis cut, the channel axes too)
    ((20, 6, 7, 5), 1, (7, 4, 3, 2)),
    ((20, 6, 7, 5), -1, (6, 2, 7, 3)),
    ((20, 6, 7, 5), (1, 3), (9, 5, 4, 2)),
    ((20, 6, 7, 5), (3, 1), (20, 1, 1, 5)),
    ((33, 4), 1, (10, 3)),
    ((5, 3, 2), 0, (2, 2, 1)),
]
TOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-12, np.int32: 1e-12}


def data(shape, dtype, seed=0, offset=3.0):
    return random_array(np.random.default_rng(seed), shape, dtype, offset=offset)


def close(actual, expected, dtype, offset=0.0):
    """Equal up to dtype's rounding, and the means' rounding (relative to offset) for normalized values."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[np.dtype(dtype).type]
    atol = tol + 1e-14 * offset
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=tol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
@pytest.mark.parametrize("shape,axis,chunks", CASES)
def test_batch_stats(shape, axis, chunks, dtype):
    x = data(shape, dtype)
    mean, var = cbn.dask.batch_stats(da.from_array(x, chunks=chunks), channel_axis=axis)
    expected = reference.batch_stats(x, channel_axis=axis)
    close(mean.compute(), expected[0], dtype)
    close(var.compute(), expected[1], dtype)


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,chunks", CASES)
def test_batch_norm_training(shape, axis, chunks, dtype, activation):
    x = data(shape, dtype, offset=1e3)
    cshape = reference.batch_stats(x, channel_axis=axis)[0].shape
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2, cshape), rng.normal(size=cshape)
    y = cbn.dask.batch_norm(da.from_array(x, chunks=chunks), gamma, beta, channel_axis=axis, activation=activation)
    assert isinstance(y, da.Array) and y.chunks == da.from_array(x, chunks=chunks).chunks
    expected = reference.batch_norm(x, gamma, beta, channel_axis=axis, activation=activation)
    close(y.compute(), expected, dtype, offset=1e3)


@pytest.mark.parametrize("shape,axis,chunks", CASES)
def test_batch_norm_inference_with_dask_statistics(shape, axis, chunks):
    """Running statistics and parameters may be Dask arrays, chunked unlike x's channels."""
    x = data(shape, np.float32)
    mean, var = (s.astype(np.float64) for s in cbn.batch_stats(data(shape, np.float32, seed=2), channel_axis=axis))
    gamma = np.linspace(0.5, 2, mean.size).reshape(mean.shape)
    as_dask = [da.from_array(p, chunks=1) for p in (mean, var, gamma)]
    y = cbn.dask.batch_norm(da.from_array(x, chunks=chunks), as_dask[2], running_mean=as_dask[0],
                            running_var=as_dask[1], training=False, channel_axis=axis, activation="tanh")
    expected = reference.batch_norm(x, gamma, running_mean=mean, running_var=var, training=False, channel_axis=axis,
                                    activation="tanh")
    close(y.compute(), expected, np.float32)


def test_empty_chunks_and_array_like_input():
    x = data((12, 3, 4), np.float64)
    chunked = da.from_array(x, chunks=((0, 5, 0, 7), (3,), (2, 2)))
    close(cbn.dask.batch_norm(chunked).compute(), cbn.batch_norm(x), np.float64)
    close(cbn.dask.batch_stats(x.tolist())[1].compute(), cbn.batch_stats(x)[1], np.float64)


def test_unknown_chunk_sizes():
    """After boolean indexing the batch's length is unknown (NaN) until computed."""
    x = data((40, 3, 5), np.float64)
    keep = x[:, 0, 0] > 3.0
    picked = da.from_array(x, chunks=(7, 2, 5))[da.from_array(keep, chunks=7)]
    assert np.isnan(picked.shape[0])
    close(cbn.dask.batch_norm(picked).compute(), cbn.batch_norm(x[keep]), np.float64)
    close(cbn.dask.batch_stats(picked)[1].compute(), cbn.batch_stats(x[keep])[1], np.float64)


def test_large_offset_keeps_float32_variance():
    x = (1e5 + np.random.default_rng(3).standard_normal((256, 4, 64))).astype(np.float32)
    var = cbn.dask.batch_stats(da.from_array(x, chunks=(10, 1, 7)))[1].compute()
    assert np.max(np.abs(var / x.astype(np.float64).var(axis=(0, 2)) - 1)) <= 1e-6


def test_lazy_until_computed():
    calls = []

    def make_block(block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.ones(block_info[None]["chunk-shape"])

    x = da.map_blocks(make_block, chunks=((4, 4), (3,), (5, 5)), dtype=np.float64)
    y = cbn.dask.batch_norm(x)
    mean, var = cbn.dask.batch_stats(x)
    assert calls == []
    y.compute()
    assert calls


@pytest.mark.parametrize("scheduler", ["threads", "synchronous", "processes"])
def test_schedulers(scheduler):
    x = data((40, 5, 6), np.float32)
    y = cbn.dask.batch_norm(da.from_array(x, chunks=(7, 2, 4)), activation="relu")
    with dask.config.set(scheduler=scheduler):
        close(y.compute(), cbn.batch_norm(x, activation="relu"), np.float32)


def test_distributed_local_cluster():
    """A distributed.LocalCluster of two worker processes on loopback."""
    distributed = pytest.importorskip("distributed")
    x = data((64, 6, 10), np.float64)
    y = cbn.dask.batch_norm(da.from_array(x, chunks=(9, 4, 3)), channel_axis=1)
    stats = cbn.dask.batch_stats(da.from_array(x, chunks=(9, 4, 3)))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        got_y, got_mean, got_var = client.compute([y, *stats], sync=True)
    close(got_y, cbn.batch_norm(x), np.float64)
    close(got_mean, reference.batch_stats(x)[0], np.float64)
    close(got_var, reference.batch_stats(x)[1], np.float64)


BAD_CALLS = [
    (lambda x: cbn.dask.batch_norm(x, running_mean=np.zeros(3), running_var=np.ones(3)), ValueError,
     "does not update running statistics"),
    (lambda x: cbn.dask.batch_norm(x, training=False), ValueError, "required when training=False"),
    (lambda x: cbn.dask.batch_norm(x, running_mean=np.zeros(3)), ValueError, "given together"),
    (lambda x: cbn.dask.batch_norm(x, np.ones(4)), ValueError, "gamma must have shape"),
    (lambda x: cbn.dask.batch_norm(x, da.ones(4)), ValueError, "gamma must have shape"),
    (lambda x: cbn.dask.batch_norm(x, da.ones(3, dtype=complex)), TypeError, "gamma has complex"),
    (lambda x: cbn.dask.batch_norm(x, eps=-1.0), ValueError, "eps"),
    (lambda x: cbn.dask.batch_norm(x, activation="gelu"), ValueError, "activation"),
    (lambda x: cbn.dask.batch_norm(x, channel_axis=3), ValueError, "out of bounds"),
    (lambda x: cbn.dask.batch_norm(x[:1, :, :1]), ValueError, "more than 1 value per channel"),
    (lambda x: cbn.dask.batch_stats(x[:0]), ValueError, "no values per channel"),
    (lambda x: cbn.dask.batch_stats(x.astype(complex)), TypeError, "complex"),
    (lambda x: cbn.dask.batch_stats(da.ones(())), ValueError, "at least 1 dimension"),
]


@pytest.mark.parametrize("call,error,match", BAD_CALLS)
def test_bad_input(call, error, match):
    x = da.ones((4, 3, 5), chunks=2)
    with pytest.raises(error, match=match):
        call(x)


def test_docstring_examples_run():
    failures, tried = doctest.testmod(cbn.dask, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0

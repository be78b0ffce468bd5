import numpy as np

import cbn

rng = np.random.default_rng(0)
x = rng.normal(5.0, 3.0, size=(32, 16, 8, 8)).astype(np.float32)  # NCHW batch
gamma, beta = np.ones(16, np.float32), np.zeros(16, np.float32)
running_mean, running_var = np.zeros(16, np.float32), np.ones(16, np.float32)

y, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, running_mean=running_mean, running_var=running_var)
dx, dgamma, dbeta = cbn.batch_norm_backward(rng.normal(size=x.shape).astype(np.float32), x, mean, invstd, gamma)
y_eval = cbn.batch_norm(x, gamma, beta, running_mean=running_mean, running_var=running_var, training=False)
print("per-channel mean of y:", float(np.abs(y.mean(axis=(0, 2, 3))).max()), "(~0)")
print("per-channel std of y: ", float(y.std(axis=(0, 2, 3)).mean()), "(~1)")
print("agrees with cbn.reference:", np.allclose(y, cbn.reference.batch_norm(x, gamma, beta), atol=1e-5))

"""``python -m cbn demo``: the paper's Figure 1, scaled down, with cbn doing the work.

An MLP with three hidden layers of 100 sigmoid units learns scikit-learn's
bundled 8x8 digits with plain SGD, batches of 60, once as is and once with a
``cbn.BatchNorm`` before every sigmoid, from the same initial weights, at a
small and at a large learning rate.  It prints test accuracy per epoch, a
summary table, and saves a figure: test accuracy against steps, and the 15th,
50th and 85th percentiles of the input to one sigmoid of the last hidden layer
over training, without and with batch norm (the internal covariate shift).
"""
import argparse
import pathlib
import sys
import time

import numpy as np

from ._layer import BatchNorm

HIDDEN = (100, 100, 100)
BATCH = 60
RATES = (1.0, 8.0)  # small; large enough that the plain network stalls
EPOCHS = 50


def load_digits_split(seed=0):
    """Digits scaled to [0, 1], a fixed stratified split: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float64)
    return tuple(train_test_split(x, data.target, test_size=0.25, random_state=seed, stratify=data.target)[i]
                 for i in (0, 2, 1, 3))


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


class MLP:
    """Fully connected sigmoid network, optionally with batch norm before each sigmoid."""

    def __init__(self, sizes, rng, batch_norm=False, norm_layer=None):
        """``norm_layer(n)`` makes each batch-norm layer (default ``cbn.BatchNorm(n, dtype=float64)``)."""
        self.weights = [rng.normal(0.0, 1.0 / np.sqrt(m), (m, n)) for m, n in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(n) for n in sizes[1:]]
        norm_layer = norm_layer or (lambda n: BatchNorm(n, dtype=np.float64))
        self.norms = [norm_layer(n) if batch_norm else None for n in sizes[1:-1]]
        self.watch = None  # pre-sigmoid inputs of the last hidden layer, from the last forward

    def parameters(self):
        params = [*self.weights, *self.biases]
        for norm in self.norms:
            if norm is not None:
                params += [norm.weight, norm.bias]
        return params

    def train(self, mode=True):
        for norm in self.norms:
            if norm is not None:
                norm.train(mode)
        return self

    def forward(self, x):
        """Logits; keeps the activations backward needs."""
        self._acts = [x]
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = h @ w + b
            if i == last:
                return z
            if self.norms[i] is not None:
                z = self.norms[i](z)
            if i == last - 1:
                self.watch = z
            h = _sigmoid(z)
            self._acts.append(h)

    def backward(self, dlogits):
        """Gradients of the loss for parameters() (same order)."""
        grads_w, grads_b = [None] * len(self.weights), [None] * len(self.weights)
        norm_grads = [None] * len(self.norms)
        g = dlogits
        for i in reversed(range(len(self.weights))):
            h = self._acts[i]
            grads_w[i] = h.T @ g
            grads_b[i] = g.sum(axis=0)
            if i == 0:
                break
            g = g @ self.weights[i].T
            g = g * h * (1.0 - h)  # through the sigmoid
            norm = self.norms[i - 1]
            if norm is not None:
                g = norm.backward(g)
                norm_grads[i - 1] = (norm.grad_weight, norm.grad_bias)
        return [*grads_w, *grads_b, *(g for pair in norm_grads if pair is not None for g in pair)]

    def predict(self, x):
        self.train(False)
        logits = self.forward(x)
        self.train(True)
        return logits.argmax(axis=1)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-300).mean()
    p[np.arange(n), labels] -= 1.0
    return loss, p / n


def train(net, data, rate, epochs, rng, on_epoch=None):
    """Plain SGD; returns history: steps, test accuracy per epoch, sigmoid-input percentiles per step."""
    x_train, y_train, x_test, y_test = data
    history = {"step": [], "accuracy": [], "percentiles": []}
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start : start + BATCH]
            logits = net.forward(x_train[batch])
            history["percentiles"].append(np.percentile(net.watch[:, 0], [15, 50, 85]))
            _, dlogits = cross_entropy(logits, y_train[batch])
            for p, g in zip(net.parameters(), net.backward(dlogits)):
                p -= rate * g
            step += 1
        history["step"].append(step)
        history["accuracy"].append(float(np.mean(net.predict(x_test) == y_test)))
        if on_epoch is not None:
            on_epoch(epoch, history["accuracy"][-1])
    history["percentiles"] = np.array(history["percentiles"])
    return history


def steps_to(history, accuracy=0.9):
    """First step count whose epoch reached ``accuracy`` on the test set, or None."""
    for step, acc in zip(history["step"], history["accuracy"]):
        if acc >= accuracy:
            return step
    return None


def run(epochs=EPOCHS, seed=0, rates=RATES, progress=True, out=None):
    """Train plain and batch-normalized networks at each rate; returns {(rate, bn): history}."""
    out = sys.stdout if out is None else out
    data = load_digits_split(seed)
    sizes = (data[0].shape[1], *HIDDEN, 10)
    results = {}
    for rate in rates:
        for bn in (False, True):
            rng = np.random.default_rng(seed)  # the same initial weights and batches for both
            net = MLP(sizes, rng, batch_norm=bn)
            label = f"rate {rate:g}, {'with' if bn else 'without'} BatchNorm"
            bar = _Bar(epochs, label, progress)
            results[rate, bn] = train(net, data, rate, epochs, rng, on_epoch=bar)
            bar.close()
    _print_table(results, rates, epochs, out)
    return results


class _Bar:
    """tqdm when installed, a plain counter line otherwise."""

    def __init__(self, total, label, enabled):
        self.enabled = enabled
        self.label = label
        self.total = total
        self.tqdm = None
        if enabled:
            try:
                from tqdm import tqdm

                self.tqdm = tqdm(total=total, desc=label, leave=True, file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, epoch, accuracy):
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.set_postfix(test_accuracy=f"{accuracy:.3f}")
            self.tqdm.update(1)
        else:
            print(f"\r{self.label}: epoch {epoch + 1}/{self.total}, test accuracy {accuracy:.3f}", end="",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.enabled:
            print(file=sys.stderr)


def _print_table(results, rates, epochs, out):
    print("\nTest accuracy per epoch (without BN / with BN):", file=out)
    header = "epoch " + " ".join(f"{f'rate {r:g}':>17}" for r in rates)
    print(header, file=out)
    for e in range(epochs):
        cells = " ".join(
            f"{results[r, False]['accuracy'][e]:8.3f}/{results[r, True]['accuracy'][e]:.3f}" for r in rates
        )
        print(f"{e + 1:5d} {cells}", file=out)
    print("\nrate   batch norm   steps to 90% test accuracy   final test accuracy", file=out)
    for r in rates:
        for bn in (False, True):
            h = results[r, bn]
            reached = steps_to(h)
            print(f"{r:<6g} {'with' if bn else 'without':<12} {reached if reached else 'never':>26}   "
                  f"{h['accuracy'][-1]:19.3f}", file=out)


def plot(results, rates, path):
    """Save the figure: accuracy vs steps, and sigmoid-input percentiles without and with BN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r, style in zip(rates, ("-", "--")):
        for bn, color in ((False, "tab:gray"), (True, "tab:blue")):
            h = results[r, bn]
            axes[0].plot(h["step"], h["accuracy"], style, color=color,
                         label=f"{'with' if bn else 'without'} BN, rate {r:g}")
    axes[0].set(title="(a) test accuracy", xlabel="training steps", ylabel="accuracy", ylim=(0, 1))
    axes[0].legend(loc="lower right")
    r = rates[0]
    for ax, bn, title in ((axes[1], False, "(b) without BN"), (axes[2], True, "(c) with BN")):
        p = results[r, bn]["percentiles"]
        for k, q in enumerate((15, 50, 85)):
            ax.plot(p[:, k], color="tab:blue" if bn else "tab:gray", alpha=0.5 + 0.25 * (k == 1), label=f"{q}th")
        ax.set(title=f"{title}: input to a last-layer sigmoid, rate {r:g}", xlabel="training steps")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cbn demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for cbn_demo.png (default: the current one)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(epochs=args.epochs, seed=args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cbn_demo.png"
    plot(results, RATES, path)
    print(f"\nsaved {path} ({time.perf_counter() - start:.1f} s)")

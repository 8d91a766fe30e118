"""Token sampling: greedy ties, temperature and the top-p (nucleus) cut, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from embedder.lm import decode

ROWS = 4000
SAMPLE = jax.jit(decode.sample, static_argnums=(4, 5))


def _draw(logits, temperature, top_p, seed=0):
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (ROWS, len(logits)))
    return np.asarray(SAMPLE(batch, jax.random.key(seed), jnp.arange(ROWS), jnp.int32(3), temperature, top_p))


def test_greedy_takes_the_first_of_equal_logits():
    logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    got = decode.sample(logits, jax.random.key(0), jnp.arange(2), jnp.int32(0), 0.0, 1.0)
    assert np.asarray(got).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    # Mass ranked above each token: 0, .5, .8, .95; top_p = .7 keeps the first two.
    draws = _draw(np.log(probs), 1.0, 0.7)
    assert set(np.unique(draws)) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
    # The order of the logits does not matter: the cut follows the probabilities.
    draws = _draw(np.log(probs[::-1]), 1.0, 0.7)
    assert set(np.unique(draws)) == {3, 2}


def test_temperature_sharpens_as_softmax_of_logits_over_t():
    logits = np.array([1.0, 0.0, -1.0])
    draws = _draw(logits, 0.5, 1.0)
    want = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / ROWS, want, atol=0.03)


def test_each_row_s_draw_depends_on_its_id_and_the_seed_only():
    a = _draw(np.zeros(50), 1.0, 1.0, seed=1)
    b = _draw(np.zeros(50), 1.0, 1.0, seed=1)
    c = _draw(np.zeros(50), 1.0, 1.0, seed=2)
    assert (a == b).all() and (a != c).mean() > 0.9

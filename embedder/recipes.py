"""The training stages of Gecko and Gemini Embedding as named sets of loss and batch terms.

`gin/runs/finetune.gin` picks one with the `RECIPE` macro and binds each term
through `term`; `gin/runs/pretrain.gin` sets the pre-finetuning terms itself.
What each term implements (notation of `losses.per_example_contrastive_loss`):

* gecko (Lee et al. 2024, arXiv:2403.20327, fine-tuning objective)::

    L_i = -log e^{s(q_i,p_i)/tau} / ( sum_j e^{s(q_i,p_j)/tau}
                                     + sum_{j != i} e^{s(q_i,q_j)/tau}
                                     + e^{s(q_i,n_i)/tau} )

  in-batch documents, same-tower queries, one own hard negative.
* gemini (Lee et al. 2025, arXiv:2503.07891, NCE objective)::

    L_i = -log e^{s(q_i,p_i)/tau} / ( e^{s(q_i,n_i)/tau}
                                     + sum_j mask(i,j) e^{s(q_i,p_j)/tau} )
    mask(i,j) = 0 if q_i = q_j or p_i = p_j (j != i), else 1

  hard negatives, no same-tower term, and every batch drawn from one task.

Both keep Gemini Embedding's duplicate mask (`losses.ContrastiveLossConfig.
mask_duplicates`): it only removes candidates whose text is the query's own or
its positive, which are false negatives under either objective.
"""

from __future__ import annotations

import dataclasses

from embedder.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RecipeTerms:
    """The terms a stage's loss and batches contain.

    Attributes:
      same_tower_negatives: `losses.ContrastiveLossConfig.same_tower_negatives`.
      task_homogeneous: `pipeline.DataConfig.task_homogeneous` (one task per batch).
    """

    same_tower_negatives: bool
    task_homogeneous: bool


RECIPES = {
    "gecko": RecipeTerms(same_tower_negatives=True, task_homogeneous=False),
    "gemini": RecipeTerms(same_tower_negatives=False, task_homogeneous=True),
}


def term(recipe: str, name: str) -> bool:
    """One term of a named recipe (what gin binds a loss or data field to).

    Args:
      recipe: "gecko" or "gemini" (gin: %RECIPE).
      name: a field of `RecipeTerms`.

    Raises:
      ConfigError: an unknown recipe or term, naming the known ones.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"RECIPE={recipe!r}: expected one of {sorted(RECIPES)}")
    fields = [f.name for f in dataclasses.fields(RecipeTerms)]
    if name not in fields:
        raise ConfigError(f"recipe term {name!r}: expected one of {fields}")
    return getattr(RECIPES[recipe], name)


def matryoshka_dims(model, smallest: int = 64, levels: int = 4) -> tuple[int, ...]:
    """Default Matryoshka sizes of a model: its embedding size halved `levels - 1` times.

    Gecko trains 768 and 256, Gemini Embedding 3072 / 1536 / 768, EmbeddingGemma
    768 / 512 / 256 / 128: nested halvings of the full size. Sizes below
    `smallest` are left out unless that leaves only the full size (a tiny
    model then still trains two resolutions).

    Args:
      model: a `models.spec.ModelSpec` (gin: %MODEL).
      smallest: the smallest size kept.
      levels: at most this many sizes.

    Returns:
      Strictly decreasing sizes, the first the model's embedding size.
    """
    full = model.module.embedding_dim
    halvings = [full // 2**k for k in range(levels) if full % 2**k == 0]
    dims = [d for d in halvings if d >= smallest]
    if len(dims) < 2:
        dims = halvings[:2]
    return tuple(dims)

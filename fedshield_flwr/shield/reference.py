"""Re-implementation of FedShield-LLM's encrypted aggregation, as the baseline to compare with.

Mirrors ``utils/HE_utils.py`` and ``utils/prune_utils.py`` of FedShield-LLM
(arXiv 2506.05640): a public-key CKKS context with N=8192, coefficient moduli [60, 40, 40, 60],
scale 2**40 and Galois keys; L1-unstructured pruning of every 2-D tensor (pruned entries are
set to zero and *still encrypted*, so the upload does not shrink); one ``CKKSVector`` per tensor;
the server sums the vectors and multiplies by ``1/K`` (unweighted mean). Used by
``benchmarks/shield.py`` only; the shield mode does not depend on it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReferenceParams:
    """FedShield-LLM's CKKS parameters (``fedshield_llm.py``)."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    scale_bits: int = 40
    galois_keys: bool = True


def reference_context(params: ReferenceParams | None = None):
    """A private TenSEAL context as FedShield-LLM builds it (public-key encryption)."""
    import tenseal as ts

    params = params or ReferenceParams()
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    if params.galois_keys:
        context.generate_galois_keys()
    context.global_scale = 2.0**params.scale_bits
    return context


def reference_public_context(context):
    """The server's copy: the same context without the secret key."""
    import tenseal as ts

    return ts.context_from(context.serialize(save_secret_key=False))


def reference_prune(state: Mapping[str, np.ndarray], sparsity: float
                    ) -> OrderedDict[str, np.ndarray]:
    """``Prune_LLM`` + ``set_weight_by_mask``: zero the ``round(sparsity * n)`` smallest-|x|
    entries of every tensor whose name contains "weight" and that has >= 2 dimensions."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, value in state.items():
        arr = np.array(value, dtype=np.float32, copy=True)
        k = int(round(sparsity * arr.size))
        if "weight" in name and arr.ndim >= 2 and k > 0:
            flat = arr.reshape(-1)
            flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0.0
        out[name] = arr
    return out


def reference_encrypt(context, state: Mapping[str, np.ndarray], sparsity: float = 0.0
                      ) -> OrderedDict[str, bytes]:
    """Prune, then encrypt one ``CKKSVector`` per tensor; returns serialized vectors."""
    import tenseal as ts

    pruned = reference_prune(state, sparsity) if sparsity > 0 else state
    return OrderedDict(
        (name, ts.ckks_vector(context, np.asarray(v, dtype=np.float64).reshape(-1)).serialize())
        for name, v in pruned.items()
    )


def reference_aggregate(public_context, payloads: Sequence[Mapping[str, bytes]]
                        ) -> OrderedDict[str, bytes]:
    """Server: deserialize, sum with ``+=``, multiply by ``1/K``; returns serialized vectors."""
    import tenseal as ts

    out: OrderedDict[str, bytes] = OrderedDict()
    for name in payloads[0]:
        total = ts.ckks_vector_from(public_context, payloads[0][name])
        for payload in payloads[1:]:
            total += ts.ckks_vector_from(public_context, payload[name])
        out[name] = (total * (1.0 / len(payloads))).serialize()
    return out


def reference_decrypt(context, aggregate: Mapping[str, bytes],
                      shapes: Mapping[str, tuple[int, ...]]) -> OrderedDict[str, np.ndarray]:
    """Silo: decrypt every tensor of the aggregate."""
    import tenseal as ts

    return OrderedDict(
        (name, np.asarray(ts.ckks_vector_from(context, data).decrypt()).reshape(shapes[name]))
        for name, data in aggregate.items()
    )

"""What a client releases, field by field, and why each field is inside its privacy guarantee.

The audit DESIGN.md asks for ("What leaves a client") as data: privacy.json carries it for the run at
hand, docs/PRIVACY.md explains it, and python_tests/test_release.py checks that a private client's
replies, in the simulator and on Flower, hold exactly these fields and nothing that depends on its
records except through the noised update.

The adjacency is add/remove of one training record of one client: the relation opacus's RDP and PRV
accountants analyse for Poisson sampling, with the sum of clipped gradients divided by the expected
batch size q n_k (so one record moves it by at most C / (q n_k)). Each client's record count n_k is
public, as in opacus and the DP-SGD literature: q = B / n_k, sigma and the FedAvg weight are set from
it before training. A replace-one neighbour (same n_k, one record changed) is two add/remove steps
away, so it is covered by group privacy of size two.
"""

from __future__ import annotations

from fedlora_ext.core.config import FedConfig

ADJACENCY = ("add/remove of one training record of one client (sample-level DP-SGD; Poisson sampling at "
             "q = B / n_k, gradients divided by q n_k); each client's record count n_k is public; a replace-one "
             "neighbour is covered by group privacy of size 2")
SERVER_ADJACENCY = "add/remove of one client's whole update (client-level DP-FedAvg at the server)"

DP_OUTPUT = "a function of the DP-SGD output (the noised update) and public values only: covered"
PUBLIC = "public under the adjacency: covered"

#: every field of a private client's training reply, simulator (``Reply``) and Flower record alike
TRAIN_REPLY = {
    "tensors / arrays": f"the uploaded factors after noised steps (SCAFFOLD: and dc_k = (x - y) / (K lr) - c, from "
                        f"them and the public c, K, lr); {DP_OUTPUT}",
    "num_examples / metrics.num-examples": f"n_k, the FedAvg weight; {PUBLIC}",
    "metrics.epsilon": f"the spend so far, a function of sigma, q and the steps the server asked; {PUBLIC}",
    "metrics.rank (Flower)": f"the client's rank after HetLoRA's pruning of its noised factors; {DP_OUTPUT}",
    "privacy.* (Flower): epsilon, delta, delta_rule, n, sigma, q, steps, accountant, target_epsilon":
        f"the account's report, a function of n_k, the configuration and the steps; {PUBLIC}",
    "budget.exhausted / budget.refused (Flower)": f"whether the account allows another round; {PUBLIC}",
}

#: what a Flower node says of itself before the first round
HELLO = {"node.cid, node.num-examples, node.rank": f"its partition id, n_k and configured rank; {PUBLIC}"}

#: a personal evaluation's reply: scores of the client's own model on its held-out test records
PERSONAL_EVALUATION = {
    "metrics.<score> (personal_accuracy, personal_loss, ...)": (
        "computed on the client's held-out test records (test_fraction of its examples), which DP-SGD does "
        "not protect: OUTSIDE the guarantee for those records (its training records are covered: the model "
        "is a DP output)"),
    "metrics.num-examples": f"the size of the held-out split, a function of n_k; {PUBLIC}",
}

#: what a private client notes in its own log and never sends
KEPT_ON_CLIENT = {
    "training loss": "an exact function of the records sampled; logged by the client (fedlora_ext.client)",
    "seconds in the DP step": "depends on the secret Poisson sample sizes; logged by the client",
    "noise key and offset": "the secret of the noise stream; the client's own storage only",
}

#: what any server sees of any federated client, whatever it sends
SIDE_CHANNELS = {
    "when a reply arrives": ("a round's wall time varies with the secret Poisson sample sizes; not sent, but a "
                             "server observes it: outside the guarantee, as on every federated system"),
}


def release_statement(config: FedConfig, *, personal: bool) -> dict:
    """The privacy report's ``release`` entry for this run: the adjacency, every field a client sends
    with its verdict, what stays on the client, and what is outside the guarantee (``personal``: the
    clients evaluate their own models on held-out records)."""
    statement: dict = {}
    if config.sample_dp:
        statement.update(adjacency=ADJACENCY, train_reply=TRAIN_REPLY, hello=HELLO, kept_on_client=KEPT_ON_CLIENT,
                         side_channels=SIDE_CHANNELS)
        outside = ["the arrival time of a reply (side channel)"]
        if personal:
            statement["personal_evaluation"] = PERSONAL_EVALUATION
            outside.append(f"personal evaluation scores on each client's held-out test records "
                           f"(test_fraction = {config.test_fraction})")
        statement["outside_guarantee"] = outside
    if config.server_dp:
        statement["server_adjacency"] = SERVER_ADJACENCY
    return statement

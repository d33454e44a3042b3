"""Privacy in a federated run: each client's DP-SGD state, the server's DP-FedAvg, and the report.

Sample-level DP (every client): sigma is calibrated per client before training, for the most local
steps it could take over the whole run (``rounds * local_steps_per_round``) at q = batch / n_k, so the
target epsilon holds even if it is sampled every round; a client sampled less spends less. A client is
never sampled past its budget: before it trains, its account checks that this round's steps keep epsilon
<= the target (:func:`budget_refusal`); retried rounds and resumed runs cannot overspend. Delta defaults
to ``min(1e-5, 1 / (10 n_k))`` per client and ``min(1e-5, 1 / (10 N))`` for DP-FedAvg over N clients.

Client-level DP at the server (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963): each client is in
a round with probability q = ``participation`` (Poisson), its update is clipped to ``server_dp_clip``,
the clipped updates are summed with Gaussian noise and divided by the expected number of clients
q N: the same ``dp_clip_noise`` op with one "sample" per client. A round with no client still adds
the noise, as the analysis assumes.
"""

from __future__ import annotations

import math

import torch

from fedlora_ext import ops
from fedlora_ext.core.config import FedConfig
from fedlora_ext.core.state import ClientState, GlobalState, Reply
from fedlora_ext.dp.accountant import PrivacyAccount
from fedlora_ext.dp.sgd import ClientPrivacy, NoiseStream
from fedlora_ext.federated.client import derive_seed
from fedlora_ext.strategies.base import Strategy


def _noise_stream(config: FedConfig, *labels) -> NoiseStream:
    if config.dp_noise_seed is None:
        return NoiseStream.fresh()
    return NoiseStream(derive_seed(config.dp_noise_seed, "noise", *labels))


def client_privacy(config: FedConfig, strategy: Strategy, cid: int, num_examples: int) -> ClientPrivacy:
    """A client's DP-SGD state: account calibrated to ``dp_epsilon`` (or ``dp_noise_multiplier``), key."""
    rate = min(1.0, config.batch_size / max(num_examples, 1))
    account = PrivacyAccount.calibrate(
        who=f"client {cid} (n = {num_examples})", population=num_examples, sample_rate=rate,
        max_steps=config.rounds * strategy.local_steps_per_round(num_examples), accountant=config.dp_accountant,
        target_epsilon=config.dp_epsilon, delta=config.dp_delta, noise_multiplier=config.dp_noise_multiplier)
    return ClientPrivacy(account=account, noise=_noise_stream(config, "client", cid), max_grad_norm=config.dp_max_grad_norm)


def budget_refusal(client: ClientState, strategy: Strategy) -> str | None:
    """Why ``client`` may not train this round (its privacy budget would be exceeded by the round's
    most steps, ``local_steps_per_round``), or None. Where the account lives elsewhere (a Flower node),
    what the node last said (``info["budget_exhausted"]``)."""
    if client.privacy is not None:
        return client.privacy.refusal(strategy.local_steps_per_round(client.num_examples), f"client {client.cid}")
    return client.info.get("budget_exhausted") or None


class ServerPrivacy:
    """DP-FedAvg at the server: Poisson client sampling, clipped updates, noised uniform average."""

    def __init__(self, config: FedConfig, strategy: Strategy, num_clients: int) -> None:
        self.config = config
        self.strategy = strategy
        self.num_clients = num_clients
        self.account = PrivacyAccount.calibrate(
            who=f"server DP-FedAvg (N = {num_clients} clients)", population=num_clients,
            sample_rate=config.participation, max_steps=config.rounds, accountant=config.server_dp_accountant,
            target_epsilon=config.server_dp_epsilon, delta=config.server_dp_delta,
            noise_multiplier=config.server_dp_noise_multiplier)
        self.noise = _noise_stream(config, "server")
        self.max_rounds = config.rounds

    def sample(self, round_index: int, clients: list[ClientState]) -> list[ClientState]:
        """Each client independently with probability ``participation`` (possibly none)."""
        chosen = self.noise.poisson_sample(len(clients), self.config.participation, round_index, stream=0xC1)
        return [clients[i] for i in chosen]

    def aggregate(self, state: GlobalState, replies: list[Reply], round_index: int) -> GlobalState:
        """``w + (sum_k clip(u_k) + N(0, (sigma S)^2)) / (q N)`` for every uploaded tensor w, where
        ``u_k`` is client k's upload minus the global value it started from."""
        refusal = self.account.refusal(1, "server DP-FedAvg")
        if refusal is not None or (self.account.target_epsilon is not None and self.account.steps >= self.max_rounds):
            # never more noisy rounds than calibrated for
            raise RuntimeError(refusal or f"server DP-FedAvg: {self.account.steps} noisy rounds done, the "
                                          f"{self.max_rounds} calibrated for; refusing another")
        names = self.strategy.upload_names(state, round_index)  # known without replies: empty rounds too
        self._check_replies(state, replies, names)
        per_client = []
        for name in names:
            start = state.tensors[name]
            updates = [reply.tensors[name].to(start.dtype) - start for reply in replies]
            per_client.append(torch.stack(updates) if updates else start.new_zeros((0, *start.shape)))
        mean_updates, _ = ops.dp_clip_noise(per_client, self.config.server_dp_clip, self.account.noise_multiplier,
                                            self.account.sample_rate * self.num_clients, self.noise.seed,
                                            self.noise.next_offset())
        self.account.step()
        updated = {name: state.tensors[name] + update for name, update in zip(names, mean_updates)}
        return GlobalState(tensors={**state.tensors, **updated}, base=state.base, info=state.info)

    @staticmethod
    def _check_replies(state: GlobalState, replies: list[Reply], names: list[str]) -> None:
        for reply in replies:
            if sorted(reply.tensors) != names:
                raise ValueError(f"DP-FedAvg: client {reply.cid} uploaded {sorted(reply.tensors)[:3]}..., expected "
                                 f"exactly {names[:3]}... ({len(names)} tensors)")
            for name in names:
                got, want = reply.tensors[name].shape, state.tensors[name].shape
                if got != want:
                    raise ValueError(f"DP-FedAvg: client {reply.cid} uploaded {name} of shape {tuple(got)}, "
                                     f"expected {tuple(want)}")


def privacy_report(clients: list[ClientState], server: ServerPrivacy | None,
                   client_reports: dict[str, dict] | None = None) -> dict:
    """epsilon, delta (and its rule), n, sigma, q, steps and accountant per client (and for the server),
    and the maximum;
    ``client_reports`` stands in for the accounts where they live elsewhere (Flower nodes report theirs)."""
    report: dict = {}
    per_client = client_reports if client_reports is not None else {
        str(c.cid): c.privacy.account.report() for c in clients if c.privacy is not None}
    if per_client:
        report["clients"] = per_client
        report["epsilon_max"] = max(r["epsilon"] for r in per_client.values())
    if server is not None:
        report["server"] = server.account.report()
    return report


def format_report(report: dict) -> str:
    """The privacy report as a small text table (the end of the CLI output)."""
    lines = []
    rows = [(f"client {cid}", r) for cid, r in report.get("clients", {}).items()]
    if "server" in report:
        rows.append(("server (client-level)", report["server"]))
    if not rows:
        return "privacy: none (no DP configured)"
    lines.append(f"{'party':<22} {'epsilon':>9} {'n':>7} {'delta':>9} {'sigma':>8} {'q':>7} {'steps':>6}  "
                 f"{'accountant':<10}  delta rule")
    for who, r in rows:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.3f}"
        n = "?" if r.get("n") is None else str(int(r["n"]))
        lines.append(f"{who:<22} {eps:>9} {n:>7} {r['delta']:>9.2e} {r['sigma']:>8.4f} {r['q']:>7.4f} "
                     f"{r['steps']:>6}  {r['accountant']:<10}  {r.get('delta_rule', '?')}")
    if "epsilon_max" in report:
        lines.append(f"sample-level epsilon (max over clients): {report['epsilon_max']:.3f}")
    return "\n".join(lines)

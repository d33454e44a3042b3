"""Privacy in a federated run: each client's DP-SGD state, the server's DP-FedAvg, and the report.

Sample-level DP (every client): sigma is calibrated per client before training, for the most local
steps it could take over the whole run (``rounds * local_steps_per_round``) at q = batch / n_k, so the
target epsilon holds even if it is sampled every round; a client sampled less spends less. A client is
never sampled past its budget: before it trains, its account checks that this round's steps keep epsilon
<= the target (:func:`budget_refusal`); retried rounds and resumed runs cannot overspend. A run extended
with more rounds keeps the sigma calibrated at its start, and its new rounds must fit each client's budget
(:mod:`fedlora_ext.federated.extension`). Delta defaults
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


def calibration_rounds(config: FedConfig) -> int:
    """The rounds DP noise is calibrated for: ``rounds``, or what an extended run pinned
    (``dp_calibration_rounds``), so that extending a run never changes the noise of its rounds."""
    return config.dp_calibration_rounds or config.rounds


def client_account(config: FedConfig, strategy: Strategy, cid: int, num_examples: int) -> PrivacyAccount:
    """A client's DP-SGD account, calibrated to ``dp_epsilon`` (or ``dp_noise_multiplier``) from public
    values only (n_k, q = B / n_k, the most steps of the run), so the server can compute it too. An
    extended run's sigma stays the one calibrated at its start (``dp_calibration_epsilon`` over
    ``dp_calibration_rounds``); its budget, the target the guard admits steps against, is ``dp_epsilon``."""
    rate = min(1.0, config.batch_size / max(num_examples, 1))
    calibrated = config.dp_epsilon if config.dp_calibration_epsilon is None else config.dp_calibration_epsilon
    account = PrivacyAccount.calibrate(
        who=f"client {cid} (n = {num_examples})", population=num_examples, sample_rate=rate,
        max_steps=calibration_rounds(config) * strategy.local_steps_per_round(num_examples),
        accountant=config.dp_accountant, target_epsilon=calibrated, delta=config.dp_delta,
        noise_multiplier=config.dp_noise_multiplier, accountant_key="dp_accountant")
    account.target_epsilon = config.dp_epsilon  # the budget (None with a given sigma: no guard)
    return account


def client_privacy(config: FedConfig, strategy: Strategy, cid: int, num_examples: int) -> ClientPrivacy:
    """A client's DP-SGD state: its account (:func:`client_account`) and its secret noise stream."""
    return ClientPrivacy(account=client_account(config, strategy, cid, num_examples),
                         noise=_noise_stream(config, "client", cid), max_grad_norm=config.dp_max_grad_norm)


class PrivacyLedger:
    """The server's own account of every client's DP-SGD spend: the authority that admits clients.

    The server never takes a client's word for its spend. It knows everything a client's account
    depends on (n_k, q = B / n_k, sigma calibrated from them, the steps of a round,
    ``local_steps_per_round``), and it records a round's steps when it asks a client to train, whether
    or not a reply comes back: a client that was asked may have trained, and a client that trained has
    spent. A client whose next round would pass its target is never asked again, whatever it says.
    """

    def __init__(self, config: FedConfig, strategy: Strategy, clients: list[ClientState]) -> None:
        self.strategy = strategy
        self.accounts = {c.cid: client_account(config, strategy, c.cid, c.num_examples) for c in clients}

    def steps_per_round(self, client: ClientState) -> int:
        return self.strategy.local_steps_per_round(client.num_examples)

    def refusal(self, client: ClientState) -> str | None:
        """Why ``client`` may not be asked to train this round (its target would be passed), or None."""
        return self.accounts[client.cid].refusal(self.steps_per_round(client), f"client {client.cid}")

    def ask(self, client: ClientState, attempt: int) -> dict:
        """Records the steps of the round ``client`` is asked to train; returns the training's record
        (a line of ``trainings`` in metrics.jsonl: client, attempt, steps, sigma, q)."""
        account = self.accounts[client.cid]
        steps = self.steps_per_round(client)
        account.step(steps)
        return {"client": client.cid, "attempt": attempt, "steps": steps, "sigma": account.noise_multiplier,
                "q": account.sample_rate}

    def steps(self, cid: int) -> int:
        return self.accounts[cid].steps

    def replay(self, history: list[dict], clients: list[ClientState]) -> None:
        """The ledger of a resumed run: the steps in ``history``'s ``trainings`` (at least what each
        client's own account holds, for runs recorded before ``trainings`` existed)."""
        for cid, account in self.accounts.items():
            asked = sum(t["steps"] for m in history for t in m.get("trainings", []) if t["client"] == cid)
            own = next((c.privacy.account.steps for c in clients if c.cid == cid and c.privacy is not None), 0)
            account.history = [(account.noise_multiplier, account.sample_rate, max(asked, own))]

    def report(self) -> dict[str, dict]:
        return {str(cid): account.report() for cid, account in self.accounts.items()}


class ServerPrivacy:
    """DP-FedAvg at the server: Poisson client sampling, clipped updates, noised uniform average."""

    def __init__(self, config: FedConfig, strategy: Strategy, num_clients: int) -> None:
        self.config = config
        self.strategy = strategy
        self.num_clients = num_clients
        self.account = PrivacyAccount.calibrate(
            who=f"server DP-FedAvg (N = {num_clients} clients)", population=num_clients,
            sample_rate=config.participation, max_steps=calibration_rounds(config),
            accountant=config.server_dp_accountant,
            target_epsilon=config.server_dp_epsilon, delta=config.server_dp_delta,
            noise_multiplier=config.server_dp_noise_multiplier, accountant_key="server_dp_accountant")
        self.noise = _noise_stream(config, "server")
        self.max_rounds = calibration_rounds(config)

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


def privacy_report(ledger: PrivacyLedger | None, server: ServerPrivacy | None,
                   client_reports: dict[str, dict] | None = None, release: dict | None = None) -> dict:
    """The run's privacy report (privacy.json): per client the server's ledger (epsilon, delta and its
    rule, n, sigma, q, steps, accountant), the maximum, each client's own report beside it
    (``client_reports``: the accounts in the simulator, what Flower nodes reported) with any
    ``disagreements`` flagged, the server's DP-FedAvg account, and ``release``: what left the clients
    and under which adjacency (:func:`fedlora_ext.federated.release.release_statement`)."""
    report: dict = {}
    if ledger is not None:
        report["clients"] = ledger.report()
        report["epsilon_max"] = max((r["epsilon"] for r in report["clients"].values()), default=0.0)
        own = client_reports or {}
        report["client_reports"] = own
        report["disagreements"] = {cid: disagreement(report["clients"][cid], own.get(cid))
                                   for cid in report["clients"] if disagreement(report["clients"][cid], own.get(cid))}
    if server is not None:
        report["server"] = server.account.report()
    if report and release is not None:
        report["release"] = release
    return report


def disagreement(ledger: dict, own: dict | None) -> str | None:
    """How a client's own report differs from the server's ledger (None when it agrees). Fewer steps
    than asked is expected of a client whose reply was lost before it trained, or that failed mid-round;
    more is a client that trained without being asked, or an account the server does not know."""
    if own is None:
        return None if ledger["steps"] == 0 else "no report from the client"
    if int(own.get("steps", -1)) != int(ledger["steps"]):
        return (f"the client reports {own.get('steps')} steps (epsilon {float(own.get('epsilon', math.nan)):.4g}), "
                f"the server asked {ledger['steps']} (epsilon {ledger['epsilon']:.4g})")
    return None


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
    release = report.get("release", {})
    if "adjacency" in release:
        lines.append(f"guarantee for: {release['adjacency']}; the training loss stays on each client")
    if release.get("outside_guarantee"):
        lines.append(f"outside the guarantee: {'; '.join(release['outside_guarantee'])} (docs/PRIVACY.md)")
    for cid, why in report.get("disagreements", {}).items():
        lines.append(f"client {cid} disagrees with the server's ledger: {why}")
    return "\n".join(lines)

#!/usr/bin/env bash
# Re-creates every table and plot of docs/RESULTS.md (about 35 minutes on 2 idle CPU cores). Every section
# starts from the main job's preset (`default`: MiniLM-L6, BBC News, 10 clients, rank 2, batch 64,
# 3 local steps) at a smaller scale: 4 rounds, half the clients per round, at least 20 examples per client. The per-variant run folders
# stay out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=(--set rounds=4 --set participation=0.5 --set min_client_examples=20 --quiet)
NODP=(--dp off --set lr=0.02)   # the non-private sections use the non-private learning rate

# (a) FFA-LoRA vs FedIT under DP-SGD (epsilon 1 and 8, the preset's learning rate) and without DP, under
#     strong label skew (Dirichlet 0.1)
fedlora compare "${SMALL[@]}" --methods fedit ffa_lora --dp on --epsilons 1 8 --alphas 0.1 --out docs/results/a_dp
fedlora compare "${SMALL[@]}" "${NODP[@]}" --methods fedit ffa_lora --alphas 0.1 --out docs/results/a_nodp
# (b) FedIT's inexact averaging vs FLoRA / FedEx-LoRA (exact); FLoRA with heterogeneous ranks vs zero-padding
fedlora compare "${SMALL[@]}" "${NODP[@]}" --methods fedit flora fedex_lora --out docs/results/b_exactness
fedlora compare "${SMALL[@]}" "${NODP[@]}" --methods flora fedit --ranks heterogeneous \
  --client-ranks 64 32 16 16 8 8 4 4 4 4 --out docs/results/b_heterogeneous_ranks
# (c) FedSA-LoRA's personalised accuracy vs FedIT's, both on each client's own test split
fedlora compare "${SMALL[@]}" "${NODP[@]}" --methods fedsa_lora fedit --alphas 0.1 --set personal_eval=true \
  --out docs/results/c_personalisation
# (d) LoRA-A2 at rank budget 1 (rank 2) vs FedIT and FFA-LoRA at rank 2
fedlora compare "${SMALL[@]}" "${NODP[@]}" --methods lora_a2 fedit ffa_lora --set lora_a2_budget=1 \
  --out docs/results/d_lora_a2
# (e) FedProx's proximal term (mu = 0.01) on and off over FedIT, under strong skew
fedlora compare "${SMALL[@]}" "${NODP[@]}" --methods fedit --alphas 0.1 --vary 'fedprox_mu=[0.0, 0.01]' \
  --out docs/results/e_fedprox

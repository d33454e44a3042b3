#!/usr/bin/env bash
# Re-creates every table and plot of docs/RESULTS.md. Every section starts from the main job's preset
# (`default`: MiniLM-L6, BBC News, 10 clients, rank 2 on query/value, one local step of a Poisson batch of
# 128 per round, 48 tokens, AdamW with a cosine learning rate) at a smaller scale: 4 rounds, half the
# clients per round, at least 20 examples per client, and every variant run with 5 seeds (0 to 4:
# partition, test split, initialisation, client sampling and, under DP, the noise), reported as the mean
# and its 95% Student-t interval. The per-run folders stay out of git.
#
#   bash docs/run_results.sh                      # every section, in the order below
#   bash docs/run_results.sh a_dp c_personalisation   # only those sections
#   FEDLORA="python -m fedlora_ext" bash docs/run_results.sh   # the checkout's command line
#
# On 2 shared CPU cores a run takes about a minute, so a section of 2-4 variants x 5 seeds takes 10-25
# minutes (FEDLORA_THREADS sets OMP_NUM_THREADS; default: torch's own choice).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a FEDLORA <<< "${FEDLORA:-fedlora}"
if [[ -n "${FEDLORA_THREADS:-}" ]]; then export OMP_NUM_THREADS="$FEDLORA_THREADS"; fi
SMALL=(--set rounds=4 --set participation=0.5 --set min_client_examples=20 --seeds 5 --quiet --overwrite)
NODP=(--dp off --set lr=0.02)   # the non-private sections use the non-private learning rate

# (a) FFA-LoRA vs FedIT under DP-SGD (epsilon 8, the preset's learning rate) and without DP, under strong
#     label skew (Dirichlet 0.1)
a_dp() { "${FEDLORA[@]}" compare "${SMALL[@]}" --methods fedit ffa_lora --dp on --epsilons 8 --alphas 0.1 \
  --out docs/results/a_dp; }
a_nodp() { "${FEDLORA[@]}" compare "${SMALL[@]}" "${NODP[@]}" --methods fedit ffa_lora --alphas 0.1 \
  --out docs/results/a_nodp; }
# (b) FLoRA with heterogeneous ranks (stacking) vs FedIT zero-padding them to the largest rank; FedIT's
#     inexact averaging vs FLoRA / FedEx-LoRA (exact)
b_heterogeneous_ranks() { "${FEDLORA[@]}" compare "${SMALL[@]}" "${NODP[@]}" --methods flora fedit \
  --ranks heterogeneous --client-ranks 64 32 16 16 8 8 4 4 4 4 --out docs/results/b_heterogeneous_ranks; }
b_exactness() { "${FEDLORA[@]}" compare "${SMALL[@]}" "${NODP[@]}" --methods fedit flora fedex_lora \
  --out docs/results/b_exactness; }
# (c) FedSA-LoRA's personalised accuracy vs FedIT's, both on each client's own test split
c_personalisation() { "${FEDLORA[@]}" compare "${SMALL[@]}" "${NODP[@]}" --methods fedsa_lora fedit --alphas 0.1 \
  --set personal_eval=true --out docs/results/c_personalisation; }
# (d) LoRA-A2 at rank budget 1 (rank 2) vs FedIT at rank 2, with the bytes each uploads
d_lora_a2() { "${FEDLORA[@]}" compare "${SMALL[@]}" "${NODP[@]}" --methods lora_a2 fedit \
  --set lora_a2_budget=1 --out docs/results/d_lora_a2; }
# (e) FedProx's proximal term (mu = 0.01) on and off over FedIT, under strong skew
e_fedprox() { "${FEDLORA[@]}" compare "${SMALL[@]}" "${NODP[@]}" --methods fedit --alphas 0.1 \
  --vary 'fedprox_mu=[0.0, 0.01]' --out docs/results/e_fedprox; }
# (f) FlexLoRA and FedSVD vs FLoRA and FFA-LoRA under DP-SGD (epsilon 8, the preset's learning rate)
f_dp_new_methods() { "${FEDLORA[@]}" compare "${SMALL[@]}" --methods flexlora fedsvd flora ffa_lora --dp on \
  --epsilons 8 --out docs/results/f_dp_new_methods; }

# (g) the main job at full scale over a bfloat16 and an NF4 base (needs pip install "fedlora_ext[quantization]";
#     about 12 minutes a run on 2 shared cores, so 2 seeds)
g_quantized() { "${FEDLORA[@]}" compare --methods ffa_lora --dp on --dtype bfloat16 \
  --vary 'quantization=["none", "nf4"]' --seeds 2 --quiet --overwrite --out docs/results/g_quantized; }

SECTIONS=(a_dp c_personalisation d_lora_a2 b_heterogeneous_ranks a_nodp f_dp_new_methods b_exactness e_fedprox
          g_quantized)
CHOSEN=("$@")
if [[ $# -eq 0 ]]; then CHOSEN=("${SECTIONS[@]}"); fi
for section in "${CHOSEN[@]}"; do
  if [[ " ${SECTIONS[*]} " != *" $section "* ]]; then echo "unknown section $section; one of: ${SECTIONS[*]}" >&2; exit 2; fi
done
for section in "${CHOSEN[@]}"; do
  echo "== $section $(date -u +%H:%M:%S)"
  "$section"
done

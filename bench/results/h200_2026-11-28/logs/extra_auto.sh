python3 .whl/auto_check.py
mkdir -p /tmp/gpu_check_logs/auto
python3 bench/gpu_infonce.py --out /tmp/gpu_check_logs/auto --d 4096 --B 16384 --rounds 4 --max-seconds 3 \
  --variants nvembed-auto,nvembed-fused,naive 2>&1 | tail -5

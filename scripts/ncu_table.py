"""Print one line per kernel of an Nsight Compute report's raw CSV page (stdin): name, grid, block
and the metrics asked for (`ncu --import r.ncu-rep --csv --page raw | python3 scripts/ncu_table.py`)."""
import csv
import sys

rows = list(csv.reader(sys.stdin))
head, data = rows[0], rows[2:]  # row 1 holds the units
want = ["Kernel Name", "Grid Size", "Block Size", "gpu__time_duration.sum",
        "dram__throughput.avg.pct_of_peak_sustained_elapsed", "smsp__inst_executed.sum", "launch__registers_per_thread"]
cols = [head.index(w) for w in want if w in head]
print(" | ".join(head[c].split(".")[0] for c in cols))
for r in data:
    print(" | ".join(r[c] for c in cols))

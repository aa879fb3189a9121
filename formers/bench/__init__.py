"""Speed and memory harness (DESIGN §5): each measured point runs in a fresh subprocess; results are resumable
JSON rows under results/ with a PNG beside them."""

"""The repair weight on the `neck` chain (issue 13): how w_t trades the target class against the backdoor there.

    PYTHONPATH=$PWD python benchmarks/neck_weight_study.py bench-mobilenetv3-blend bench-mobilenetv3-badnets-white-br \
        bench-efficientnet-badnets-white-br

MODEL as in ``repair2_study.py``; trigger known; the `neck` chain (``conv_head`` then the classifier) at lam 0.01,
the engine's defaults otherwise, with the repair weight w_t of the clean target-class images at 4 (the default),
9, 16 and 32. CA / ASR / TA on 100 other held-out images per class; they choose nothing.
"""
import sys, torch
torch.set_num_threads(2)
sys.path.insert(0, "benchmarks")
from repair2_study import setting
from agme_hub.data import Preprocessor, load_images
from agme_hub.engine.metrics import predict
from agme_hub.engine import clean, evaluate
test = load_images("fashion-mnist", split="test")
for name in sys.argv[1:]:
    model, trigger, target, edit, held = setting(name, test)
    b = evaluate(model, held, trigger, target)
    others = held.images[held.labels != target]
    natural = (predict(model, others, Preprocessor.from_model(model)) == target).mean()
    print(name, "before", round(b.clean_accuracy*100,1), round(b.attack_success_rate*100,1), round(b.target_accuracy*100,1),
          "natural confusion", round(natural*100,1), flush=True)
    for wt in (4.0, 9.0, 16.0, 32.0):
        r = clean(model, edit, trigger=trigger, target=target, layers=["conv_head","classifier"], lam_grid=(0.01,), target_weight=wt, seed=0)
        a = evaluate(r.model, held, trigger, target)
        print(name, "wt", wt, round(a.clean_accuracy*100,1), round(a.attack_success_rate*100,1), round(a.target_accuracy*100,1), flush=True)

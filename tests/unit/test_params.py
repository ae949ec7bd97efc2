"""adaptflow.params: the real params.yaml loads; every problem is a ParamsError naming the dotted key."""

from __future__ import annotations

import pytest
import yaml

from adaptflow import params as P


def test_real_params_yaml_loads(params_path):
    p = P.load(params_path)
    raw = yaml.safe_load(params_path.read_text())
    assert p.seed == raw["seed"]
    assert p.pretrain.model == raw["pretrain"]["model"]
    assert p.finetune.lr == pytest.approx(raw["finetune"]["lr"])
    assert p.finetune.strategies == raw["finetune"]["strategies"]
    assert p.augment.source.preset == raw["augment"]["source"]["preset"]
    assert [t.name for t in p.augment.target.transforms] == [t["name"] for t in raw["augment"]["target"]["transforms"]]
    assert set(p.evaluate.baselines) <= set(p.finetune.strategies)


def test_missing_file_is_params_error(tmp_path):
    with pytest.raises(P.ParamsError, match="no such params file"):
        P.load(tmp_path / "nope.yaml")


def test_non_mapping_yaml_is_params_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(P.ParamsError, match="mapping"):
        P.load(f)


def test_invalid_yaml_is_params_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("finetune: {lr: [\n")
    with pytest.raises(P.ParamsError, match="not valid YAML"):
        P.load(f)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("finetune:\n  epochs: 3\n  lr: 0.01\n  epochs: 5\n")
    with pytest.raises(P.ParamsError, match=r"key 'epochs' is given twice \(lines 2 and 4\)"):
        P.load(f)


@pytest.mark.parametrize("override, key", [("foo=1", "foo"), ("finetune.lrr=0.1", "finetune.lrr"), ("target.kk=3", "target.kk"),
                                           ("register.marg=0.1", "register.marg")])
def test_unknown_key_names_dotted_key(params_path, override, key):
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, [override])
    msg = str(exc.value)
    assert f"{key}: unknown key" in msg


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("finetune:\n  lrr: 0.1\n")
    with pytest.raises(P.ParamsError, match=r"finetune\.lrr"):
        P.load(f)


@pytest.mark.parametrize(
    "override, key",
    [
        ("finetune.lr=-1", "finetune.lr"),
        ("finetune.lr=0", "finetune.lr"),
        ("finetune.epochs=0", "finetune.epochs"),
        ("finetune.backbone_lr_scale=2", "finetune.backbone_lr_scale"),
        ("target.k=-1", "target.k"),
        ("target.val_fraction=0.6", "target.val_fraction"),
        ("source.limit=3", "source.limit"),
        ("preprocess.channels=2", "preprocess.channels"),
        ("preprocess.image_size=4", "preprocess.image_size"),
        ("finetune.strategies=[scratch, source_only, transmogrify]", "finetune.strategies"),
        ("finetune.strategies=[scratch, scratch, source_only]", "finetune.strategies"),
        ("source.domain=cifar", "source.domain"),
        ("target.domain=svhn", "target.domain"),
        ("pretrain.model=resnet_does_not_exist", "pretrain.model"),
        ("register.margin=2", "register.margin"),
        ("augment.preview_n=0", "augment.preview_n"),
        ("register.model_name=x-{tgt}", "register.model_name"),  # only {target}
        ("register.model_name=my model/{target}", "register.model_name"),  # the registry refuses '/' and ':'
        ("register.model_name=a:{target}", "register.model_name"),
        ("register.model_name=' '", "register.model_name"),
        ("orchestrate.timezone=Mars/Olympus", "orchestrate.timezone"),
        ("finetune.epochs=true", "finetune.epochs"),  # YAML's true is not 1
        ("seed=false", "seed"),
        ("finetune.layer_decay=true", "finetune.layer_decay"),
    ],
)
def test_bad_value_names_key(params_path, override, key):
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, [override])
    assert f"{key}:" in str(exc.value)


def test_bad_value_names_where_it_came_from(params_path, tmp_path):
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, ["finetune.lr=0.1", "finetune.epochs=-1"])
    assert str(exc.value).startswith("--set finetune.epochs=-1: finetune.epochs:")
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("finetune: {epochs: 0}\n")
    with pytest.raises(P.ParamsError) as exc:
        P.load(bad_file, ["finetune.lr=0.1"])  # the file's value, not the --set beside it
    assert str(exc.value).startswith(f"{bad_file}: finetune.epochs:")
    with pytest.raises(P.ParamsError) as exc:
        P.load(bad_file, ["finetune={epochs: 0, lr: 0.1}"])  # a whole section given on the command line
    assert str(exc.value).startswith("--set finetune={epochs: 0, lr: 0.1}: finetune.epochs:")


def test_bad_value_messages_are_specific(params_path):
    with pytest.raises(P.ParamsError, match="finetune.epochs: true is not a number"):
        P.load(params_path, ["finetune.epochs=true"])
    assert P.load(params_path, ["orchestrate.dvc_commit=false"]).orchestrate.dvc_commit is False  # a real bool still is one
    with pytest.raises(P.ParamsError, match="transmogrify"):
        P.load(params_path, ["finetune.strategies=[scratch, source_only, transmogrify]"])
    with pytest.raises(P.ParamsError, match="cifar"):
        P.load(params_path, ["source.domain=cifar"])
    with pytest.raises(P.ParamsError, match="resnet_does_not_exist"):
        P.load(params_path, ["pretrain.model=resnet_does_not_exist"])


@pytest.mark.parametrize("domain", P.BUILTIN_DOMAINS)
@pytest.mark.parametrize("role", P.ROLES)
def test_every_builtin_domain_accepted(params_path, role, domain):
    assert getattr(P.load(params_path, [f"{role}.domain={domain}"]), role).domain == domain


@pytest.mark.parametrize("strategy", P.STRATEGIES)
def test_every_strategy_accepted_alone(params_path, strategy):
    p = P.load(params_path, [f"finetune.strategies=[{strategy}]", "evaluate.baselines=[]", "register.require_baselines=false"])
    assert p.finetune.strategies == [strategy]


def test_fractions_must_leave_train(params_path):
    with pytest.raises(P.ParamsError, match="target") as exc:
        P.load(params_path, ["target.val_fraction=0.45", "target.test_fraction=0.45"])
    assert "val_fraction + test_fraction" in str(exc.value)


MISSPELLED_TRANSFORM = "augment.source=[{name: RandomAffin, degrees: 3}]"


def test_misspelled_transform_fails_naming_section_and_name(params_path):
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, [MISSPELLED_TRANSFORM])
    msg = str(exc.value)
    assert "augment" in msg and "source" in msg and "RandomAffin" in msg


def test_misspelled_transform_names_dotted_key(params_path):
    with pytest.raises(P.ParamsError, match=r"augment\.source"):
        P.load(params_path, [MISSPELLED_TRANSFORM])


@pytest.mark.parametrize("spec", ["[{name: Resize}]", "[{name: RandomAffine, degreez: 3}]",
                                  "[{name: RandomChoice, transforms: [{name: Rezise, size: 8}]}]",
                                  "[{name: RandomChoice, p: [0], transforms: [{name: RandomInvert}]}]"])
def test_bad_transform_argument_fails_on_load(params_path, spec):
    with pytest.raises(P.ParamsError, match="augment"):
        P.load(params_path, [f"augment.target={spec}"])


@pytest.mark.parametrize("key, spec, says", [
    ("augment.target", "[{name: Normalize, mean: [0.5], std: [0.5]}]", "fails on a batch of uint8 1×32×32 images (TypeError"),
    ("augment.source", "[{name: Resize, size: 64}]", "into 1×64×64"),
    ("augment.target", "[{name: Grayscale, num_output_channels: 3}]", "into 3×32×32"),
    ("finetune.fixmatch.strong", "[{name: CenterCrop, size: 20}]", "into 1×20×20"),
])
def test_pipeline_that_changes_the_images_fails_on_load(params_path, key, spec, says):
    """Training feeds a pipeline stored uint8 images and needs them back as such: a transform that normalises,
    resizes or casts fails at params load, naming the pipeline, not mid-training."""
    over = [f"{key}={spec}" if key != "augment.target" else f"augment.target.transforms={spec}",
            "finetune.strategies=[scratch,source_only,fixmatch]"]
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, over)
    assert f"{key}: it " in str(exc.value) and says in str(exc.value)


@pytest.mark.parametrize("spec, says", [
    ("[{name: RandomApply, p: 0.01, transforms: [{name: Resize, size: 64}]}]", "into 1×64×64 (with every random branch taken)"),
    ("[{name: RandomChoice, p: [0.99, 0.01], transforms: [{name: Resize, size: 32}, {name: CenterCrop, size: 20}]}]",
     "into 1×20×20 (with every random branch taken, option 2 of each RandomChoice)"),
    ("[{name: RandomApply, p: 0.02, transforms: [{name: RandomChoice, transforms: [{name: Identity}, {name: Normalize, mean: [0.5], std: [0.5]}]}]}]",
     "fails on a batch of uint8 1×32×32 images (with every random branch taken, option 2"),
])
def test_a_rarely_taken_branch_that_changes_the_images_fails_on_load(params_path, spec, says):
    """Branches four draws would almost never take are forced once each."""
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, [f"augment.target.transforms={spec}"])
    assert "augment.target: it " in str(exc.value) and says in str(exc.value)


def test_a_branch_that_never_runs_is_not_held_against_the_pipeline(params_path):
    never = "[{name: RandomApply, p: 0.0, transforms: [{name: Resize, size: 64}]}, {name: RandomChoice, p: [1.0, 0.0], transforms: [{name: Identity}, {name: Resize, size: 9}]}]"
    assert P.load(params_path, [f"augment.target.transforms={never}"]).augment.target.transforms


def test_model_with_a_fixed_input_size_needs_that_size(params_path):
    """A ViT built for 224 px cannot take the stored 32 px images: refused at load, saying what to set."""
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, ["pretrain.model=vit_tiny_patch16_224"])
    assert "--set pretrain.model=vit_tiny_patch16_224: pretrain.model: vit_tiny_patch16_224 cannot take 32×32 inputs" in str(exc.value)
    assert "set pretrain.input_size: 224" in str(exc.value)
    assert P.load(params_path, ["pretrain.model=vit_tiny_patch16_224", "pretrain.input_size=224"]).pretrain.input_size == 224
    assert P.load(params_path, ["pretrain.model=resnet18"]).pretrain.input_size is None  # any size
    # timm marks it fixed-size too, yet it takes 32 px: the probe, not the mark, decides
    assert P.load(params_path, ["pretrain.model=test_vit"]).pretrain.model == "test_vit"


def test_unknown_pretrained_tag_fails_on_load(params_path):
    with pytest.raises(P.ParamsError, match=r"pretrain.model: resnet18.bogus_tag: .*tag"):
        P.load(params_path, ["pretrain.model=resnet18.bogus_tag"])


def test_pipeline_may_resize_if_it_resizes_back(params_path):
    p = P.load(params_path, ["augment.target.transforms=[{name: Resize, size: 12}, {name: Resize, size: 32}]"])
    assert [t.name for t in p.augment.target.transforms] == ["Resize", "Resize"]


def test_baselines_must_run(params_path):
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, ["finetune.strategies=[finetune, linear_probe]"])
    assert "evaluate.baselines" in str(exc.value)
    # dropping the baselines is refused unless the gate is told it may promote without them
    with pytest.raises(P.ParamsError) as exc:
        P.load(params_path, ["finetune.strategies=[finetune, linear_probe]", "evaluate.baselines=[]"])
    assert "evaluate.baselines lacks ['scratch', 'source_only']" in str(exc.value) and "register.require_baselines" in str(exc.value)
    p = P.load(params_path, ["finetune.strategies=[finetune, linear_probe]", "evaluate.baselines=[]", "register.require_baselines=false"])
    assert p.evaluate.baselines == []


def test_gate_baselines_follow_k(params_path):
    """scratch cannot run without target labels: at k = 0 only source_only is required."""
    with pytest.raises(P.ParamsError, match=r"lacks \['scratch'\]"):
        P.load(params_path, ["evaluate.baselines=[source_only]"])
    p = P.load(params_path, ["target.k=0", "finetune.strategies=[source_only,dann]", "evaluate.baselines=[source_only]"])
    assert p.evaluate.baselines == ["source_only"]
    with pytest.raises(P.ParamsError, match=r"lacks \['source_only'\]"):
        P.load(params_path, ["target.k=0", "finetune.strategies=[source_only,dann]", "evaluate.baselines=[]"])


# --- overrides ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("finetune.lr=0.01", lambda p: p.finetune.lr, 0.01),
        ("finetune.lr=1e-3", lambda p: p.finetune.lr, 0.001),
        ("seed=7", lambda p: p.seed, 7),
        ("target.k=3", lambda p: p.target.k, 3),
        ("source.limit=100", lambda p: p.source.limit, 100),
        ("source.limit=null", lambda p: p.source.limit, None),
        ("finetune.strategies=[scratch, source_only]", lambda p: p.finetune.strategies, ["scratch", "source_only"]),
        ("register.model_name=digits-{target}=x", lambda p: p.register.model_name, "digits-{target}=x"),
        (" finetune.epochs = 4", lambda p: p.finetune.epochs, 4),
        ("augment.target=[]", lambda p: p.augment.target.specs(), []),
    ],
)
def test_override_applies_yaml_typed_value(params_path, override, getter, expected):
    assert getter(P.load(params_path, [override])) == expected


def test_override_value_is_yaml_typed():
    assert P.parse_override("finetune.lr=0.5") == (["finetune", "lr"], 0.5)
    assert P.parse_override("a.b=true") == (["a", "b"], True)
    assert P.parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert P.parse_override("a=x=y") == (["a"], "x=y")
    assert P.parse_override("a=") == (["a"], "")


@pytest.mark.parametrize("item", ["finetune.seeds=[0", "augment.target.transforms=[{name: Resize, size: 8]", "finetune.lr=: x: y"])
def test_override_that_is_not_yaml_names_the_key(item):
    with pytest.raises(P.ParamsError) as exc:
        P.parse_override(item)
    assert str(exc.value).startswith(f"--set {item!r}: {item.split('=')[0]}: the value is not valid YAML (")


def test_later_override_wins_and_file_untouched(params_path):
    before = params_path.read_text()
    p = P.load(params_path, ["finetune.lr=0.1", "finetune.lr=0.2"])
    assert p.finetune.lr == 0.2
    assert params_path.read_text() == before


def test_apply_overrides_does_not_mutate_input():
    data = {"finetune": {"lr": 0.1}}
    out = P.apply_overrides(data, ["finetune.lr=0.3", "new.section.key=1"])
    assert data == {"finetune": {"lr": 0.1}}
    assert out == {"finetune": {"lr": 0.3}, "new": {"section": {"key": 1}}}


@pytest.mark.parametrize("bad", ["foo", "finetune.lr", "", "=3", "...=3"])
def test_malformed_override_raises(params_path, bad):
    with pytest.raises(P.ParamsError, match="--set"):
        P.load(params_path, [bad])


def test_override_through_a_value_is_rejected(params_path):
    with pytest.raises(P.ParamsError, match="not a section"):
        P.load(params_path, ["seed.x=1"])


# --- section_hash -------------------------------------------------------------------------------------


def test_section_hash_changes_only_with_its_section(params_path):
    base = P.load(params_path)
    same = P.load(params_path)
    lr = P.load(params_path, ["finetune.lr=0.005"])
    assert base.section_hash("finetune") == same.section_hash("finetune")
    assert base.section_hash("finetune") != lr.section_hash("finetune")
    assert base.section_hash("pretrain") == lr.section_hash("pretrain")
    assert base.section_hash("pretrain", "seed") == lr.section_hash("pretrain", "seed")
    assert base.section_hash("seed") != P.load(params_path, ["seed=1"]).section_hash("seed")


def test_section_hash_depends_on_the_names(params_path):
    p = P.load(params_path)
    assert p.section_hash("finetune") != p.section_hash("pretrain")
    assert p.section_hash("finetune", "seed") != p.section_hash("finetune")
    assert p.section_hash("finetune", "seed") == p.section_hash("seed", "finetune")


def test_section_hash_dotted_names(params_path):
    base = P.load(params_path)
    tgt = P.load(params_path, ["augment.target=[{name: RandomAffine, degrees: 3}]"])
    src = P.load(params_path, ["augment.source=[{name: Resize, size: 32}]"])
    assert base.section_hash("augment.source") == tgt.section_hash("augment.source")
    assert base.section_hash("augment.source") != src.section_hash("augment.source")
    assert base.section_hash("augment.target") != tgt.section_hash("augment.target")
    assert base.section_hash("augment") != tgt.section_hash("augment")
    strat = P.load(params_path, ["finetune.lr=0.1"])
    assert base.section_hash("finetune.strategies") == strat.section_hash("finetune.strategies")
    # a nested transform argument counts
    nested = P.load(params_path, ["augment.source=[{name: RandomChoice, transforms: [{name: Resize, size: 9}]}, {name: Resize, size: 32}]"])
    nested2 = P.load(params_path, ["augment.source=[{name: RandomChoice, transforms: [{name: Resize, size: 10}]}, {name: Resize, size: 32}]"])
    assert nested.section_hash("augment.source") != nested2.section_hash("augment.source")


def test_round_trip_through_dict(params_path):
    p = P.load(params_path)
    q = P.from_dict(p.to_dict())
    assert q == p
    for name in ("finetune", "augment", "augment.source", "target", "register", "seed"):
        assert q.section_hash(name) == p.section_hash(name)


def test_a_params_file_without_a_register_section_gets_its_defaults():
    """`register` shadows a name of pydantic's base class: its default must still be the Register section."""
    for p in (P.Params(), P.from_dict({"seed": 1})):
        assert p.register == P.Register() and p.registered_model_name() == "adaptflow-uci_digits"
        assert P.from_dict(p.to_dict()) == p


def test_registered_model_name(params_path):
    p = P.load(params_path, ["register.model_name=af-{target}", "target.domain=uci_digits"])
    assert p.registered_model_name() == "af-uci_digits"


def test_one_folder_spelled_two_ways_is_one_domain_and_one_registered_model(params_path):
    """`./data/raw/x/` and `data/raw/x` are one folder: one spelling in params, so one model (and its champion)
    and one stage input, not a new model whose first run is compared with no champion."""
    spellings = ["imagefolder:data/raw/x", "imagefolder:./data/raw/x/", " imagefolder:data//raw/./x "]
    loaded = [P.load(params_path, [f"target.domain={d}"]) for d in spellings]
    assert {p.target.domain for p in loaded} == {"imagefolder:data/raw/x"}
    assert {p.registered_model_name() for p in loaded} == {"adaptflow-imagefolder-data-raw-x"}
    assert P.load(params_path, ["source.domain=csv:./m.csv"]).source.domain == "csv:m.csv"
    # `..` stays: after a symlink or `~` it names another folder than the text without it
    assert P.load(params_path, ["target.domain=imagefolder:~/../x/"]).target.domain == "imagefolder:~/../x"


@pytest.mark.parametrize("key", ["pretrain.batch_size", "finetune.batch_size"])
def test_a_training_batch_of_one_is_refused_before_any_work(params_path, key):
    with pytest.raises(P.ParamsError, match=rf"{key}"):
        P.load(params_path, [f"{key}=1"])


def test_params_are_frozen(params_path):
    p = P.load(params_path)
    with pytest.raises(Exception):
        p.finetune.lr = 1.0  # type: ignore[misc]


def test_no_target_labels_refuses_strategies_that_need_them(params_path):
    with pytest.raises(P.ParamsError, match=r"finetune.strategies.*need labeled target images"):
        P.load(params_path, overrides=["target.k=0"])
    ok = P.load(params_path, overrides=["target.k=0", "finetune.strategies=[source_only,dann+fixmatch]", "evaluate.baselines=[source_only]"])
    assert ok.target.k == 0


def test_no_target_labels_refuses_choosing_checkpoints_on_target_val(params_path):
    label_free = ["target.k=0", "finetune.strategies=[source_only,dann+fixmatch]", "evaluate.baselines=[source_only]"]
    with pytest.raises(P.ParamsError, match=r"finetune.selection: val .* target.k is 0"):
        P.load(params_path, overrides=[*label_free, "finetune.selection=val"])
    for rule in ("auto", "im", "source_val"):
        assert P.load(params_path, overrides=[*label_free, f"finetune.selection={rule}"]).finetune.selection == rule
    assert P.load(params_path, overrides=["finetune.selection=val"]).target.k > 0


@pytest.mark.parametrize("bad, message", [("dan", "unknown strategy part"), ("fixmatch+finetune", "at most one base"),
                                          ("linear_probe+dann", "takes no objectives")])
def test_strategy_names_are_checked_on_load(params_path, bad, message):
    with pytest.raises(P.ParamsError, match=rf"finetune\.strategies: .*{message}"):
        P.load(params_path, overrides=[f"finetune.strategies=[scratch,source_only,{bad}]"])


@pytest.mark.parametrize("strategies, says", [
    ('[scratch, "dann + fixmatch"]', "'dann + fixmatch': write it 'dann+fixmatch'"),
    ("[dann+fixmatch, fixmatch+dann]", "'fixmatch+dann' is the same strategy as 'dann+fixmatch'"),
    ("[dann, finetune+dann]", "'finetune+dann' is the same strategy as 'dann'"),
    ("[scratch, scratch]", "strategies must not repeat ('scratch')"),
])
def test_one_strategy_has_one_spelling(params_path, strategies, says):
    """A strategy's name becomes its output folder, run name and table row: spaces and a second spelling
    of the same strategy (which would train it twice) are refused."""
    with pytest.raises(P.ParamsError, match="finetune.strategies") as exc:
        P.load(params_path, [f"finetune.strategies={strategies}"])
    assert says in str(exc.value)


def test_a_plain_typo_is_reported_before_torch_loads(params_path):
    """A bad plain value (a number, a strategy name, a key) fails without importing torch, torchvision or timm:
    the first of the two validation passes needs none of them."""
    import subprocess
    import sys

    code = ("import sys\nfrom adaptflow import params\n"
            "for override in ('pretrain.batch_size=-5', 'finetune.strategies=[scratch,source_only,dann+bogus]', 'finetune.l2sp.alfa=1'):\n"
            "    try:\n        params.load(sys.argv[1], [override])\n    except params.ParamsError as exc:\n        print(exc)\n"
            "print('heavy:', sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(params_path)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "pretrain.batch_size: Input should be greater than or equal to 2" in out
    assert "finetune.strategies: unknown strategy part(s) ['bogus']" in out
    assert "finetune.l2sp.alfa: unknown key" in out
    assert out.rstrip().endswith("heavy: []"), out


def test_plain_only_leaves_the_checks_that_need_torch_to_the_full_load(params_path):
    """``plain_only`` is a first look: a model name or a transform it cannot check passes it, the full load refuses."""
    for override, says in [("pretrain.model=resnet10tt", "pretrain.model: 'resnet10tt' is not a timm model name"),
                           ("augment.target.transforms=[{name: RandomAfine}]", "augment.target"),
                           ("augment.source.preset=digitz", "augment.source.preset: unknown preset 'digitz'")]:
        assert P.load(params_path, [override], plain_only=True)  # not checked here
        with pytest.raises(P.ParamsError, match=says.replace("(", r"\(").replace("[", r"\[")):
            P.load(params_path, [override])


def test_a_plain_error_is_reported_first(params_path):
    """With a plain and a torch-needing error at once, the plain one comes (the other after it is fixed)."""
    with pytest.raises(P.ParamsError) as err:
        P.load(params_path, ["pretrain.model=resnet10tt", "pretrain.lr=-1"])
    assert "pretrain.lr" in str(err.value) and "resnet10tt" not in str(err.value)


@pytest.mark.parametrize("data", [{}, {"augment": {"source": {"preset": "digits"}}},
                                  {"pretrain": {"epochs": 0, "weights": "w.safetensors"}}])
def test_the_plain_pass_needs_no_torch_for_defaults_or_a_source_model_file(data):
    """Sections left out (augmentation defaults) and `epochs: 0` with a file take the plain pass without torch."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom adaptflow import params\nparams.from_dict(json.loads(sys.argv[1]), plain_only=True)\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(data)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("value", ["../shared", "/tmp/reports", "~/reports", "a/../../b", ".", "", "C:/out", "\\abs", "\\\\server\\share"])
def test_output_paths_outside_the_project_are_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"paths\.reports: .* is not a folder inside the project"):
        P.from_dict({"paths": {"reports": value}})
    assert P.from_dict({"paths": {"reports": "out/reports"}}).paths.reports == "out/reports"
    assert P.from_dict({"paths": {"reports": " ./out/~x "}}).paths.reports == "./out/~x"


def test_an_empty_params_file_is_refused_and_an_empty_mapping_means_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(P.ParamsError, match=r"empty\.yaml: the file is empty"):
        P.load(empty)
    empty.write_text("{}\n")
    assert P.load(empty) == P.Params()


def test_a_single_item_where_a_list_belongs_and_a_kind_without_a_path_say_how_to_write_them(params_path):
    with pytest.raises(P.ParamsError, match=r"finetune\.strategies: Input should be a valid list \(one item is a list too: write \[scratch\]\)"):
        P.load(params_path, ["finetune.strategies=scratch"])
    with pytest.raises(P.ParamsError, match=r"target\.domain: imagefolder: names no path; write imagefolder:PATH"):
        P.load(params_path, ["target.domain=imagefolder:"])

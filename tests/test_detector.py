"""The streaming detector on real recordings: quality at the default threshold, chunking, batching, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from kwsd.audio.wavfile import read_wav
from kwsd.kws.decoder import SAMPLES_PER_FRAME, KeywordError, tokenize
from kwsd.kws.detector import Detection, Detector, build_keywords, detect_samples, new_decoder
from kwsd.kws.evaluation import Positives, evaluate
from kwsd.kws.session import ModelSession
from kwsd.settings import DetectorSettings, KeywordSettings

# The one dev positive the model cannot hear: its last 云 is never emitted (p(云) <= 0.0011 around the keyword;
# greedy decoding reads 小云响). No threshold can find it without accepting three-syllable partial matches.
UNHEARD = "20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_49.wav"


@pytest.fixture(scope="module")
def session(model_path: Path) -> ModelSession:
    return ModelSession(model_path, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def detector(session: ModelSession) -> Detector:
    return Detector(session, DetectorSettings())


def test_dev_set_quality_at_the_default_threshold(detector: Detector, positives: list[Path],
                                                  negatives: list[Path]) -> None:
    missed = []
    for path in positives:
        hits = detect_samples(detector, path.name, read_wav(path))
        assert len(hits) <= 1, f"{path.name}: one keyword fired {len(hits)} times"
        if not hits:
            missed.append(path.name)
        else:
            assert hits[0].keyword == "小云小云" and hits[0].score >= DetectorSettings().keywords[0].threshold
            kw = DetectorSettings().keywords[0]
            # start/end bound the windows of the first and last syllable peaks: one 25 ms window more than the span
            assert kw.min_duration <= hits[0].end - hits[0].start <= kw.max_duration + 0.025
    assert missed == [UNHEARD]
    for path in negatives:
        assert detect_samples(detector, path.name, read_wav(path)) == [], f"{path.name} fired"


def _blockwise(session: ModelSession, samples: np.ndarray, block: int | None) -> list[Detection]:
    return detect_samples(Detector(session, DetectorSettings()), "s", samples, block)


def _highest_firing_threshold(probs: np.ndarray, session: ModelSession, floor: float, top_k: int) -> float:
    """The highest threshold at which the keyword still fires on these posteriors (0: no path at all)."""
    from kwsd.kws.detector import build_keywords, new_decoder

    search = DetectorSettings(top_k=top_k, token_floor=floor)

    def fires(threshold: float) -> bool:
        kws = build_keywords([KeywordSettings(threshold=threshold)], session.contract.tokens, 0.03)
        return bool(new_decoder(kws, search, 0.03).step(probs, 0))

    lo, hi = 0.0, 1.0
    if not fires(1e-6):
        return 0.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fires(mid) else (lo, mid)
    return lo


def test_the_unheard_positive_scores_below_a_half_said_keyword(session: ModelSession, audio_dir: Path) -> None:
    """Why UNHEARD stays missed: even with the per-frame pruning opened up (floor 0.001, top 50), its best
    小云小云 path scores below a clip where 小云 is said once and unrelated speech follows; any threshold
    low enough for it would fire on that."""
    import importlib.util

    from kwsd.kws.cli import posteriors
    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("hard", REPO / "scripts" / "make_hard_negatives.py")
    assert spec is not None and spec.loader is not None
    hard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hard)

    unheard = _highest_firing_threshold(posteriors(session, read_wav(audio_dir / "positive" / UNHEARD)),
                                        session, 0.001, 50)
    src = read_wav(audio_dir / "positive" / "20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_39.wav")
    ids = tokenize("小云小云", session.contract.tokens)
    frames = hard.keyword_frames(hard.greedy(posteriors(session, src)), ids)
    assert frames is not None
    cut = hard.quietest_cut(src, frames[1] * SAMPLES_PER_FRAME, frames[2] * SAMPLES_PER_FRAME)
    other = read_wav(audio_dir / "negative" / "fd59df10517f4a92ab9b1d31cd94c0b9_a486c2e324934eaab7595e30bc1b9f29.wav")
    clip = np.concatenate([src[:cut], src[:1600], other])
    half_said = _highest_firing_threshold(posteriors(session, clip), session, 0.001, 50)
    assert 0.0 < unheard < half_said, (unheard, half_said)


def _shifted(session: ModelSession, samples: np.ndarray, shift: int, phases: int = 3
             ) -> list[tuple[str, float, int, int]]:
    """Detections on the audio without its first ``shift`` samples, in the original audio's time."""
    hits = detect_samples(Detector(session, DetectorSettings(), phases=phases), "s", samples[shift:])
    return [(h.keyword, h.score, h.start_sample + shift, h.end_sample + shift) for h in hits]


def test_detections_do_not_depend_on_the_lfr_phase(session: ModelSession, positives: list[Path]) -> None:
    """Every positive, started 0, 10 and 20 ms later: the same detections (time within one 10 ms frame, score
    within 0.02). The model frame is 30 ms, so these are its three framings of the same speech."""
    for path in positives:
        samples = read_wav(path)
        base = _shifted(session, samples, 0)
        for shift in (160, 320):
            got = _shifted(session, samples, shift)
            assert [k for k, *_ in got] == [k for k, *_ in base], (path.name, shift)
            for (_, score, start, end), (_, score0, start0, end0) in zip(got, base, strict=True):
                assert abs(score - score0) <= 0.02, (path.name, shift, score, score0)
                assert abs(start - start0) <= 160 and abs(end - end0) <= 160, (path.name, shift)


def test_one_phase_alone_depends_on_where_the_audio_starts(session: ModelSession, audio_dir: Path) -> None:
    """What the three phases fix: the model's training framing alone scores one clip 0.997 or 0.428 depending on
    a 10 ms offset; with all three phases it is the best of them either way."""
    samples = read_wav(audio_dir / "positive" / "20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_1.wav")
    one = [_shifted(session, samples, shift, phases=1)[0][1] for shift in (0, 160, 320)]
    three = [_shifted(session, samples, shift)[0][1] for shift in (0, 160, 320)]
    assert max(one) - min(one) > 0.5, one
    assert max(three) - min(three) <= 0.02 and min(three) >= max(one) - 0.02, (one, three)


@pytest.mark.parametrize("name", ["20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_15.wav",
                                  "20200707_spk57db_storenoise52db_40cm_xiaoyun_sox_23.wav",
                                  "kws_xiaoyunxiaoyun.wav"])
def test_detections_do_not_depend_on_block_size(session: ModelSession, audio_dir: Path, name: str) -> None:
    samples = read_wav(audio_dir / "positive" / name)
    whole = _blockwise(session, samples, None)
    assert len(whole) == 1
    for seconds in (0.01, 0.03, 0.1, 1.0):
        hits = _blockwise(session, samples, int(seconds * 16000))
        assert len(hits) == 1, f"{seconds}s blocks: {hits}"
        assert abs(hits[0].score - whole[0].score) <= 1e-4
        assert abs(hits[0].start_sample - whole[0].start_sample) <= 480
        assert abs(hits[0].end_sample - whole[0].end_sample) <= 480


def test_odd_block_sizes_and_int16_input(session: ModelSession, audio_dir: Path) -> None:
    samples = read_wav(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")
    whole = _blockwise(session, samples, None)
    ragged = _blockwise(session, samples.astype(np.int16), 1237)
    assert [(h.start_sample, h.end_sample) for h in ragged] == [(h.start_sample, h.end_sample) for h in whole]


def test_many_streams_in_one_batch_equal_streams_alone(session: ModelSession, positives: list[Path],
                                                       negatives: list[Path]) -> None:
    """Streams joining at different times, batched together, give the detections each gives alone."""
    files = positives[:6] + negatives[:4]
    audio = {p.name: read_wav(p) for p in files}
    alone = {n: [(h.keyword, round(h.score, 4), h.start_sample) for h in _blockwise(session, a, 1600)]
             for n, a in audio.items()}
    det = Detector(session, DetectorSettings())
    got: dict[str, list] = {n: [] for n in audio}
    block = 1600
    offsets = {n: i * 3 for i, n in enumerate(audio)}  # stream i joins after 3*i blocks
    pos = dict.fromkeys(audio, 0)
    tick = 0
    while any(pos[n] < a.size for n, a in audio.items()):
        for n, a in audio.items():
            if tick == offsets[n]:
                det.add_stream(n)
            if tick >= offsets[n] and pos[n] < a.size:
                det.accept(n, a[pos[n] : pos[n] + block])
                pos[n] += block
                if pos[n] >= a.size:
                    for h in det.finish(n):
                        got[h.stream].append((h.keyword, round(h.score, 4), h.start_sample))
                    det.remove_stream(n)
        for h in det.step():
            got[h.stream].append((h.keyword, round(h.score, 4), h.start_sample))
        tick += 1
    assert det.timing.steps > 0 and det.timing.frames > 0
    for n in audio:
        assert [(k, s) for k, s, _ in got[n]] == [(k, s) for k, s, _ in alone[n]], n
        assert [st for *_, st in got[n]] == [st for *_, st in alone[n]], n


def test_the_output_layer_runs_only_where_a_keyword_token_can_pass_the_floor(
        session: ModelSession, positives: list[Path], negatives: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose keyword tokens' bounds stay below the floor skip the 2599-wide output layer; detections and
    near misses (scores and sample positions included), the frames the searches advanced on, their rejections and
    their final states all equal those of a detector computing every row."""
    streams = {f"s{i}": np.concatenate([read_wav(p) for p in positives[i::4][:3] + negatives[i::4][:2]])
               for i in range(4)}
    computed = [0, 0]

    def run(every_row: bool) -> list[tuple]:  # type: ignore[type-arg]
        det = Detector(session, DetectorSettings(site_thresholds={"s1": 0.999}), near_miss_ratio=0.3)
        if every_row:
            monkeypatch.setattr(det, "_need", lambda streams: None)
        out: list[tuple] = []  # type: ignore[type-arg]
        for i, name in enumerate(streams):
            det.add_stream(name, start_sample=1000 * i)
        block = 1600
        longest = max(a.size for a in streams.values())
        for at in range(0, longest, block):
            for name, a in streams.items():
                if at < a.size:
                    det.accept(name, a[at : at + block])
            out.extend(det.step())
            out.extend(det.near_misses())
        # What the searches saw: frames with a keyword token in play, and the candidates they rejected.
        seen = [(name, [dec.beam_frames for dec in det._streams[name].phased.decoders], det.rejected(name),
                 [[(search.collapsed, sorted(search.hyps.items())) for search in dec._searches]
                  for dec in det._streams[name].phased.decoders])
                for name in streams]
        for name in streams:
            out.extend(det.finish(name))
        out.extend(det.near_misses())
        computed[:] = [det.timing.computed, det.timing.rows]
        return seen + [(d.stream, d.keyword, d.score, d.start_sample, d.end_sample, d.decided_sample, d.near_miss)
                       for d in out]

    full = run(every_row=True)
    assert computed[0] == computed[1] > 0
    selected = run(every_row=False)
    assert selected == full
    hits = full[len(streams):]
    assert sum(1 for d in hits if not d[-1]) >= 6 and any(d[-1] for d in hits), "keywords fire, near misses too"
    assert computed[0] < 0.2 * computed[1], f"the output layer ran on {computed[0]} of {computed[1]} frames"


def test_samples_needed_is_exactly_what_the_next_step_takes(session: ModelSession, audio_dir: Path) -> None:
    """The daemon sleeps until a site has ``samples_needed`` more samples: one fewer must not run a model step,
    that many must (so pacing the pipeline by it adds no latency)."""
    audio = read_wav(audio_dir / "positive" / "kws_xiaoyunxiaoyun.wav")
    det = Detector(session, DetectorSettings(step_frames=3))
    det.add_stream("s")
    pos = rounds = 0
    while pos + det.samples_needed("s") <= audio.size:
        rounds += 1
        need = det.samples_needed("s")
        assert need > 0
        det.accept("s", audio[pos:pos + need - 1])
        steps = det.timing.steps
        det.step()
        assert det.timing.steps == steps, "a step ran before its audio was complete"
        assert det.samples_needed("s") == 1
        det.accept("s", audio[pos + need - 1:pos + need])
        det.step()
        assert det.timing.steps == steps + 1
        pos += need
    assert rounds >= 6


def test_refractory_period_counts_samples(session: ModelSession, audio_dir: Path) -> None:
    """The same keyword twice 1.2 s apart: two wakes with a 1 s refractory period, one with 3 s."""
    one = read_wav(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")[16000:44000]  # 0.75 s .. 2.75 s
    twice = np.concatenate([one, np.zeros(3200, np.float32), one])
    assert len(detect_samples(Detector(session, DetectorSettings(refractory=1.0)), "s", twice)) == 2
    assert len(detect_samples(Detector(session, DetectorSettings(refractory=3.0)), "s", twice)) == 1


def test_decoder_from_settings(session: ModelSession) -> None:
    """The config's search settings reach the decoder; a refractory period of whole frames stays whole."""
    s = DetectorSettings(refractory=0.27, beam=7, top_k=5, token_floor=0.02)
    keywords = build_keywords(s.keywords, session.contract.tokens, 0.03)
    dec = new_decoder(keywords, s, 0.03)
    assert (dec.beam, dec.top_k, dec.token_floor, dec.refractory_frames) == (7, 5, 0.02, 9)
    assert dec.keywords == tuple(keywords)
    assert new_decoder(keywords, DetectorSettings(refractory=1.0), 0.03).refractory_frames == 34
    assert Detector(session, s).refractory_frames == 9


def _write_wav(path: Path, samples: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.rint(samples).astype("<i2").tobytes())
    return path


def test_eval_decodes_like_the_detector(session: ModelSession, audio_dir: Path, tmp_path: Path) -> None:
    """``kwsd eval`` counts what the detector finds: the same keyword twice 1.2 s apart is two false alarms with
    a 1 s refractory period and one with 3 s, at every offset."""
    one = read_wav(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")[16000:44000]
    twice = np.concatenate([one, np.zeros(3200, np.float32), one])
    _write_wav(tmp_path / "twice" / "twice.wav", twice)
    threshold = DetectorSettings().keywords[0].threshold
    for refractory, wakes in ((1.0, 2), (3.0, 1)):
        s = DetectorSettings(refractory=refractory)
        hits = detect_samples(Detector(session, s), "s", twice)
        assert len(hits) == wakes
        result = evaluate(session, s, [Positives(tmp_path / "twice")], [tmp_path / "twice"], [threshold],
                          progress=False)
        [report] = result.keywords
        [row] = report.rows
        assert (row.detected, row.false_alarms) == (1, wakes), refractory
        assert row.recall_by_shift == [1.0, 1.0, 1.0]
        assert [(fa["start"], fa["score"]) for fa in report.false_alarms] == [
            (round(h.start, 3), round(h.score, 4)) for h in hits]


def test_eval_streams_in_chunks_like_the_detector(session: ModelSession, positives: list[Path],
                                                 negatives: list[Path]) -> None:
    """A recording longer than one inference chunk of ``kwsd eval`` (several blocks and chunks, every threshold's
    decoders fed the kept columns only): the same detections as the live detector, at every offset."""
    from kwsd.kws.evaluation import CHUNK_FRAMES, decode_recording

    audio = np.concatenate([read_wav(p) for p in positives[:8] + negatives[:4]])
    assert audio.size > 3 * CHUNK_FRAMES * 480
    s = DetectorSettings()
    threshold = s.keywords[0].threshold
    for shift in (0, 160, 320):
        live = detect_samples(Detector(session, s), "s", audio[shift:], 1600)
        blocks = [audio[i : i + 40000] for i in range(0, audio.size, 40000)]
        result = decode_recording(session, s, blocks, [0.9, threshold], shift)
        assert len(live) >= 7
        assert [(f.wakeword_id, round(f.start, 3), round(f.score, 4)) for f in result.hits[threshold]] == [
            (h.wakeword_id, round((h.start_sample + shift) / 16000, 3), round(h.score, 4)) for h in live]
        assert len(result.hits[0.9]) < len(live)
        assert result.seconds == audio.size / 16000


def test_several_keywords_each_fire_on_the_model_card_example(session: ModelSession, audio_dir: Path) -> None:
    """你好小云 and 小云小云 configured together on "你好我是小云小云": each fires (neither masks the other)."""
    samples = read_wav(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")
    s = DetectorSettings(keywords=(KeywordSettings(phrase="小云小云"), KeywordSettings(phrase="你好小云")))
    hits = detect_samples(Detector(session, s), "s", samples)
    assert sorted(h.keyword for h in hits) == ["你好小云", "小云小云"], hits
    alone = detect_samples(Detector(session, DetectorSettings()), "s", samples)
    [xiaoyun] = [h for h in hits if h.keyword == "小云小云"]
    assert (xiaoyun.score, xiaoyun.start_sample) == (alone[0].score, alone[0].start_sample)


def test_unknown_keyword_character_is_named(session: ModelSession) -> None:
    with pytest.raises(KeywordError, match=r"detector\.keywords\[0\]\.phrase: .*'Ω'"):
        Detector(session, DetectorSettings(keywords=(KeywordSettings(phrase="小Ω小云"),)))


def test_custom_keyword_and_stream_offsets(session: ModelSession, audio_dir: Path) -> None:
    samples = read_wav(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")  # says 你好我是小云小云
    det = Detector(session, DetectorSettings(keywords=(KeywordSettings(phrase="小云小云", threshold=0.25),
                                                       KeywordSettings(phrase="你好", id="nihao",
                                                                       threshold=0.25, min_duration=0.1))))
    det.add_stream("s", start_sample=16000 * 100)
    det.accept("s", samples)
    hits = det.step() + det.finish("s")
    assert [h.wakeword_id for h in hits] == ["nihao", "小云小云"]
    assert all(h.start_sample >= 16000 * 100 and h.decided_sample >= h.end_sample for h in hits)


def test_detect_command(model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    stereo48 = tmp_path / "stereo48k.wav"
    mono = read_wav(audio_dir / "positive/kws_xiaoyunxiaoyun.wav")
    from scipy.signal import resample_poly

    up = resample_poly(mono, 3, 1)
    with wave.open(str(stereo48), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(np.stack([np.zeros_like(up), up], axis=1).astype("<i2").tobytes())
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    neg = next((audio_dir / "negative").glob("*.wav"))
    cmd = [sys.executable, "-m", "kwsd", "detect", "--model", str(model_path), "--channel", "1",
           str(stereo48), str(bad), str(neg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(d["file"], d["keyword"]) for d in lines] == [(str(stereo48), "小云小云")]
    assert {"score", "start", "end", "wakewordId", "threshold"} <= set(lines[0])
    assert "broken.wav" in r.stderr
    # channel 0 is silent: nothing to detect there
    r0 = subprocess.run([*cmd[:7], "0", str(stereo48)], capture_output=True, text=True, timeout=120)
    assert r0.returncode == 0 and r0.stdout == ""


def test_eval_command(model_path: Path, audio_dir: Path, tmp_path: Path) -> None:
    """The real entry point: one table per keyword, every offset, the misses explained, an unreadable negative
    reported and skipped with exit status 1, and the DET plot written."""
    png = tmp_path / "det.png"
    neg = tmp_path / "neg"
    neg.mkdir()
    for p in sorted((audio_dir / "negative").glob("*.wav"))[:10]:
        (neg / p.name).write_bytes(p.read_bytes())
    (neg / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    r = subprocess.run([sys.executable, "-m", "kwsd", "eval", "--model", str(model_path), "--json",
                        "--keyword", "小云小云", "--keyword", "你好小云",
                        "--positive", str(audio_dir / "positive"), "--negative", str(neg),
                        "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "broken.wav" in r.stderr and "Traceback" not in r.stderr
    assert "less than an hour" in r.stderr
    out = json.loads(r.stdout)
    assert [u["file"] for u in out["unreadable"]] == [str(neg / "broken.wav")]
    assert out["negative_files"] == 10
    xiaoyun, nihao = out["keywords"]
    assert (xiaoyun["keyword"], nihao["keyword"]) == ("小云小云", "你好小云")
    assert xiaoyun["shifts_ms"] == [0.0, 10.0, 20.0]
    rows = {row["threshold"]: row for row in xiaoyun["rows"]}
    default = rows[DetectorSettings().keywords[0].threshold]
    assert default["detected"] == default["positives"] - 1 and default["false_alarms"] == 0
    assert rows[0.95]["detected"] < default["detected"]
    assert [(Path(m["file"]).name, m["shift_ms"]) for m in xiaoyun["missed"]] == [
        (UNHEARD, 0.0), (UNHEARD, 10.0), (UNHEARD, 20.0)]
    assert all(m["best_score"] < default["threshold"] for m in xiaoyun["missed"])
    # Only the model card's example says 你好小云 among these positives.
    assert len(nihao["missed"]) == 3 * (nihao["positives"] - 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_only_on_a_terminal() -> None:
    import io

    from kwsd.kws.evaluation import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        bar = Progress(120.0, stream)
        bar.add(60.0)
        bar.close()
    assert "50.0%" in term.getvalue() and "1.0/2.0 min" in term.getvalue()
    assert pipe.getvalue() == ""

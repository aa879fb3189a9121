"""Time-series forecasting on CSV files: the Informer protocol (P73) on ETTh1, and the same rules for any CSV.

Components: the task `forecast` (P73), the time features `time_features` (the official `timeF` encoding), the
CSV reader `read_csv_series`, and `plot_forecast` (one window: history, truth and forecast).

Facts from zhouhaoyi/Informer2020 (Apache-2.0), read, not copied:
- data/data_loader.py `Dataset_ETT_hour`: borders train [0, 12*30*24), val [12*30*24 - seq_len, 16*30*24),
  test [16*30*24 - seq_len, 20*30*24) (8640 / 11520 / 14400 rows; the last 3,020 of ETTh1's 17,420 rows are
  unused); `Dataset_ETT_minute` the same times 4; `Dataset_Custom` (every other CSV) 70 / 10 / 20 %: n_train =
  int(0.7 n), n_test = int(0.2 n), val the rest, each later split starting seq_len rows early. Columns: `date`, the
  others, the target last (Dataset_Custom moves it there; in ETT files OT is already last).
- utils/tools.py `StandardScaler`: mean and std (numpy, ddof 0) of the training rows, applied to every row.
- `__getitem__`: window i of a split starting at row b: x = rows [b+i, b+i+seq_len), y = rows
  [b+i+seq_len-label_len, b+i+seq_len+pred_len); the split has len - seq_len - pred_len + 1 windows (stride 1).
- exp/exp_informer.py `_process_one_batch`: decoder input = y's first label_len rows, then pred_len zeros; the
  target is y's last pred_len rows, all channels (M, S) or the last one (MS, f_dim = -1). Loss nn.MSELoss on the
  scaled data; `test` reports MSE and MAE (utils/metrics.py) on the scaled data, means over windows, steps and
  channels. Features M: 7 -> 7, S: the target only 1 -> 1, MS: 7 -> 1.
- utils/timefeatures.py (timeenc = 1 for embed 'timeF', the default of main_informer.py): features in [-0.5, 0.5]
  per frequency; hourly = [HourOfDay, DayOfWeek, DayOfMonth, DayOfYear] = [hour/23, weekday/6 (Monday 0),
  (day-1)/30, (dayofyear-1)/365] - 0.5.

Our choices where the official loop differs from this harness (say so in results):
- Test windows: we score every window; the official test loader has drop_last=True and silently skips the last
  (n_windows mod batch_size) windows (at most 31 of ~2,860).
- Training batches are drawn by the trainer (uniformly, with replacement, from the task's generator); the official
  loader shuffles each epoch without replacement. `benchmarks/informer_etth1.py` uses epoch permutations.
- `evaluate` scores val and, when `eval_test` (default), test on every call, as the official loop prints both each
  epoch; early stopping reads `val_mse` (lower is better).
- Scoring and `forecast_csv` predict under a fixed seed (0) for the global RNG streams (CPU and the model's CUDA
  device), restored afterwards (`fixed_rng`): a model that draws random numbers in eval mode (Informer's
  ProbSparse key sample with sample_seed=None) gives the same metrics on every call, and the training stream is
  not touched. The official test draws from the running stream.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from formers.registry import FormersError, register
from formers.tasks.base import Task

SPLITS = ("train", "val", "test")
ETT_ENV = "FORMERS_ETT"

# The official `time_features_from_frequency_str` lists (utils/timefeatures.py), keyed by our `freq` option.
FREQ_FEATURES: dict[str, tuple[str, ...]] = {
    "s": ("second_of_minute", "minute_of_hour", "hour_of_day", "day_of_week", "day_of_month", "day_of_year"),
    "t": ("minute_of_hour", "hour_of_day", "day_of_week", "day_of_month", "day_of_year"),
    "h": ("hour_of_day", "day_of_week", "day_of_month", "day_of_year"),
    "d": ("day_of_week", "day_of_month", "day_of_year"),
    "b": ("day_of_week", "day_of_month", "day_of_year"),
    "w": ("day_of_month", "week_of_year"),
    "m": ("month_of_year",),
}


def default_csv() -> Path:
    """ETTh1.csv: $FORMERS_ETT (the file, or a folder holding ETTh1.csv) if set, else shared/data/ett/ETTh1.csv
    beside the checkout (resolved from the package location, so it does not depend on the working directory)."""
    env = os.environ.get(ETT_ENV)
    if env:
        p = Path(env).expanduser()
        return p / "ETTh1.csv" if p.is_dir() else p
    import formers

    return Path(formers.__file__).resolve().parents[2] / "shared" / "data" / "ett" / "ETTh1.csv"


def time_features(dates: np.ndarray, freq: str = "h") -> np.ndarray:
    """The official `timeF` encoding: (n,) datetime64 -> (n, F) float32, every feature in [-0.5, 0.5].

    hour/23, minute/59, second/59, weekday/6 (Monday = 0), (day of month - 1)/30, (day of year - 1)/365,
    (month - 1)/11, (ISO week - 1)/52, each minus 0.5; which ones and in what order depends on `freq`."""
    if freq not in FREQ_FEATURES:
        raise FormersError(f"task.freq: unknown frequency '{freq}'; choices: {', '.join(FREQ_FEATURES)}")
    t = dates.astype("datetime64[s]")
    day = t.astype("datetime64[D]")
    month = t.astype("datetime64[M]")
    year = t.astype("datetime64[Y]")
    secs = (t - day).astype(np.int64)  # seconds since midnight
    cols = {
        "second_of_minute": lambda: (secs % 60) / 59.0,
        "minute_of_hour": lambda: (secs // 60 % 60) / 59.0,
        "hour_of_day": lambda: (secs // 3600) / 23.0,
        "day_of_week": lambda: ((day.astype(np.int64) + 3) % 7) / 6.0,  # 1970-01-01 was a Thursday (3)
        "day_of_month": lambda: (day - month.astype("datetime64[D]")).astype(np.int64) / 30.0,
        "day_of_year": lambda: (day - year.astype("datetime64[D]")).astype(np.int64) / 365.0,
        "month_of_year": lambda: (month.astype(np.int64) % 12) / 11.0,
        "week_of_year": lambda: np.array([_dt.date.fromisoformat(str(d)).isocalendar()[1] - 1 for d in day]) / 52.0,
    }
    out = np.stack([cols[name]() - 0.5 for name in FREQ_FEATURES[freq]], axis=1)
    return out.astype(np.float32)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str], str]]:
    """(1-based line number, fields, the line's text) of each non-blank row of a CSV, the header first; blank
    lines (a trailing newline, an empty line) are skipped. Missing file: FormersError."""
    if not path.is_file():
        raise FormersError(f"forecast: no CSV at {path}; check the path")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            yield reader.line_num, fields, ",".join(fields)


def _value_columns(path: Path, header: list[str], target: str) -> list[str]:
    """The value columns of a CSV header, the target moved last; FormersError without `date` or `target`."""
    if "date" not in header:
        raise FormersError(f"forecast: {path} needs a 'date' column (the official data format); columns: {header}")
    if target not in header or target == "date":
        raise FormersError(f"task.target: column '{target}' is not in {path}; columns: {header}")
    return [h for h in header if h not in ("date", target)] + [target]


def read_csv_header(path: str | Path, target: str = "OT") -> list[str]:
    """The value columns of a CSV (target last), read from its header line only."""
    p = Path(path)
    with contextlib.closing(_csv_rows(p)) as rows:
        first = next(rows, None)
    if first is None:
        raise FormersError(f"forecast: {p} is empty")
    return _value_columns(p, [h.strip() for h in first[1]], target)


def read_csv_series(path: str | Path, target: str = "OT") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a CSV with a `date` column and numeric columns -> (dates (n,) datetime64[s], values (n, C) float64,
    column names), the target column moved last (as the official Dataset_Custom does). Blank lines are skipped;
    a row that is not a date and numbers raises a FormersError naming its line number and text."""
    p = Path(path)
    with contextlib.closing(_csv_rows(p)) as rows:
        first = next(rows, None)
        if first is None:
            raise FormersError(f"forecast: {p} is empty")
        header = [h.strip() for h in first[1]]
        names = _value_columns(p, header, target)
        di = header.index("date")
        idx = [header.index(h) for h in names]
        dates, values = [], []
        for line, fields, text in rows:
            try:
                date = np.datetime64(fields[di].strip().replace(" ", "T", 1), "s")
                if np.isnat(date):
                    raise ValueError("no date")
                values.append([float(fields[i]) for i in idx])
            except (ValueError, IndexError) as e:
                raise FormersError(f"forecast: {p} line {line} is not 'date, numbers...' for the columns {header} "
                                   f"({e}): {text!r}") from None
            dates.append(date)
    if not dates:
        raise FormersError(f"forecast: {p} has no data rows")
    return np.array(dates, dtype="datetime64[s]"), np.array(values, dtype=np.float64), names


def _model_device(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """`device` if given, else the device of the model's first parameter (CPU for a model without any)."""
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def fixed_rng(device: torch.device | str = "cpu", seed: int = 0) -> Iterator[None]:
    """Run the block with the global RNG streams of the CPU and (CUDA) of `device` seeded with `seed`, and give
    them back their states afterwards (torch.random.fork_rng): whatever a prediction draws (ProbSparse's key
    sample with sample_seed=None) is the same on every call, and the training stream is left as it was."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        # torch.manual_seed(seed) restricted to the forked streams (it would also reseed any other CUDA device)
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


@register("task", "forecast", paper="P73")
class ForecastTask(Task):
    """Multi-horizon forecasting of a CSV time series with the Informer protocol (P73).

    Data: `csv` (default ETTh1, see `default_csv`), a `date` column and numeric channels, `target` (OT) moved
    last. Splits by `borders`: 'ett_hour' (ETTh*: 8640 / 2880 / 2880 rows), 'ett_minute' (ETTm*: 4x), 'ratio'
    (70 / 10 / 20 %, Dataset_Custom); 'auto' picks by file name (ETTh*, ETTm*, else ratio). StandardScaler fitted
    on the training rows. features: M (all channels -> all), S (target -> target), MS (all -> target). `freq`:
    the time-feature set (official lists): h for ETTh (4 features), t for 15-minute ETTm (5), s, d, b, w, m.

    Batches: {"x_enc": (B, seq_len, C_in), "x_mark_enc": (B, seq_len, F), "x_dec": (B, label_len + pred_len,
    C_in) with the last pred_len steps zero, "x_mark_dec": (B, label_len + pred_len, F), "y": (B, pred_len,
    C_out)}; the model is called as model(x_enc, x_mark_enc, x_dec, x_mark_dec) -> (B, pred_len, C_out).
    Loss: MSE on the scaled data. Metrics: {split}_mse, {split}_mae over all windows, steps and output channels of
    val (and test when `eval_test`). `eval_limit` caps the windows of the periodic evaluations only.
    """

    metric = "val_mse"
    mode = "min"

    def __init__(self, csv: str | None = None, features: Literal["M", "S", "MS"] = "M", target: str = "OT",
                 seq_len: int = 96, label_len: int = 48, pred_len: int = 24, freq: str = "h",
                 borders: Literal["auto", "ett_hour", "ett_minute", "ratio"] = "auto", scale: bool = True,
                 eval_test: bool = True, eval_batch_size: int = 256, eval_limit: int | None = None):
        if features not in ("M", "S", "MS"):
            raise FormersError(f"task.features: must be M, S or MS, got {features!r}")
        if min(seq_len, pred_len) < 1 or label_len < 0:
            raise FormersError(f"task: seq_len and pred_len must be >= 1 and label_len >= 0 (got {seq_len}, "
                               f"{pred_len}, {label_len})")
        if label_len > seq_len:
            raise FormersError(f"task.label_len: {label_len} exceeds seq_len {seq_len}; the decoder's known part "
                               "is the end of the input window")
        if freq not in FREQ_FEATURES:
            raise FormersError(f"task.freq: unknown frequency '{freq}'; choices: {', '.join(FREQ_FEATURES)}")
        if borders not in ("auto", "ett_hour", "ett_minute", "ratio"):
            raise FormersError(f"task.borders: must be auto, ett_hour, ett_minute or ratio, got {borders!r}")
        if eval_batch_size < 1:
            raise FormersError(f"task.eval_batch_size: must be >= 1, got {eval_batch_size}")
        self.csv = csv
        self.features, self.target = features, target
        self.seq_len, self.label_len, self.pred_len = seq_len, label_len, pred_len
        self.freq, self.borders_rule, self.scale = freq, borders, scale
        self.eval_test, self.eval_batch_size, self.eval_limit = eval_test, eval_batch_size, eval_limit
        self._ready = False
        self._header: list[str] | None = None  # the CSV's value columns, read once (see `c_in`)

    # -- data ----------------------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.csv).expanduser() if self.csv else default_csv()

    def _borders(self, n: int) -> dict[str, tuple[int, int]]:
        rule = self.borders_rule
        if rule == "auto":
            stem = self.path.stem
            rule = "ett_hour" if stem.startswith("ETTh") else "ett_minute" if stem.startswith("ETTm") else "ratio"
        if rule in ("ett_hour", "ett_minute"):
            k = 30 * 24 * (4 if rule == "ett_minute" else 1)
            ends = (12 * k, 16 * k, 20 * k)
            if n < ends[2]:
                raise FormersError(f"task.borders: {rule} needs {ends[2]} rows, {self.path} has {n}; use "
                                   "borders=ratio")
        else:
            n_train, n_test = int(n * 0.7), int(n * 0.2)
            ends = (n_train, n - n_test, n)
        s = self.seq_len
        return {"train": (0, ends[0]), "val": (ends[0] - s, ends[1]), "test": (ends[1] - s, ends[2])}

    def prepare(self) -> None:
        if self._ready:
            return
        if not self.path.is_file():
            raise FormersError(f"forecast: no CSV at {self.path}; give task.csv=PATH, or set ${ETT_ENV} to ETTh1.csv "
                               "(the default is shared/data/ett/ETTh1.csv beside the checkout)")
        dates, values, names = self._load(self.path)
        self.columns = names
        self.borders = self._borders(len(values))
        for split, (a, b) in self.borders.items():
            if a < 0 or b - a < self.seq_len + self.pred_len:
                raise FormersError(f"task: the {split} split rows [{a}, {b}) of {self.path} are too few for "
                                   f"seq_len {self.seq_len} + pred_len {self.pred_len}; shorten them")
        train = values[self.borders["train"][0]:self.borders["train"][1]]
        self.mean = train.mean(0) if self.scale else np.zeros(values.shape[1])
        self.std = train.std(0) if self.scale else np.ones(values.shape[1])
        if np.any(self.std == 0):
            raise FormersError(f"forecast: a column of {self.path} is constant on the training rows "
                               f"({[c for c, s in zip(names, self.std) if s == 0]}); drop it")
        self.dates = dates
        self.data = self._scale(values)  # (n, C) scaled
        self.marks = torch.from_numpy(time_features(dates, self.freq))  # (n, F)
        self._ready = True

    def _load(self, path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """A CSV's dates (n,), values (n, C) in its own units and column names, as this task reads them: the
        target last, and only the target for features S."""
        dates, values, names = read_csv_series(path, self.target)
        if self.features == "S":
            values, names = values[:, -1:], names[-1:]
        return dates, values, names

    def _scale(self, values: np.ndarray) -> torch.Tensor:
        """(n, C) values in the CSV's units -> float32 scaled with the training rows' mean and std."""
        return torch.from_numpy((values - self.mean) / self.std).float()

    def _assemble(self, data: torch.Tensor, marks: torch.Tensor, start: torch.Tensor) -> dict[str, torch.Tensor]:
        """The windows starting at rows `start` (B,) of scaled values `data` (n, C) and their time features
        `marks` (n, F): x = rows [start, start + seq_len); the decoder's rows [start + seq_len - label_len,
        start + seq_len + pred_len), their last pred_len values zeroed in x_dec and the target y."""
        s, lab, p = self.seq_len, self.label_len, self.pred_len
        enc = start[:, None] + torch.arange(s)  # (B, seq_len) row numbers
        dec = start[:, None] + torch.arange(s - lab, s + p)  # (B, label_len + pred_len)
        y_full = data[dec]  # (B, label_len + pred_len, C)
        x_dec = torch.cat([y_full[:, :lab], torch.zeros_like(y_full[:, lab:])], dim=1)
        c_out = y_full.shape[-1] if self.features == "M" else 1
        return {"x_enc": data[enc], "x_mark_enc": marks[enc], "x_dec": x_dec, "x_mark_dec": marks[dec],
                "y": y_full[:, lab:, -c_out:]}

    @property
    def c_in(self) -> int:
        if self.features == "S":
            return 1
        if self._header is None:
            self._header = read_csv_header(self.path, self.target)
        return len(self._header)

    @property
    def c_out(self) -> int:
        return self.c_in if self.features == "M" else 1

    def model_defaults(self) -> dict[str, Any]:
        out = {"seq_len": self.seq_len, "label_len": self.label_len, "pred_len": self.pred_len,
               "mark_dim": len(FREQ_FEATURES[self.freq])}
        if self.path.is_file():  # else `prepare` names the missing file, after the model's options are checked
            out.update(enc_in=self.c_in, dec_in=self.c_in, c_out=self.c_out)
        return out

    def num_windows(self, split: str) -> int:
        if split not in SPLITS:
            raise FormersError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
        self.prepare()
        a, b = self.borders[split]
        return b - a - self.seq_len - self.pred_len + 1

    def train_size(self) -> int:
        return self.num_windows("train")

    def windows(self, split: str, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of windows `idx` (B,) of `split` (see the class docstring for the keys and shapes)."""
        self.prepare()
        return self._assemble(self.data, self.marks, self.borders[split][0] + idx.long())

    def train_batch(self, batch_size, generator):
        idx = torch.randint(self.train_size(), (batch_size,), generator=generator)
        return self.windows("train", idx)

    def count(self, batch):
        """Windows in a batch (the trainer's `tokens_per_s` is windows/s for this task)."""
        return batch["x_enc"].shape[0]

    # -- loss and metrics ----------------------------------------------------------------------------------------
    @staticmethod
    def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["x_enc"], batch["x_mark_enc"], batch["x_dec"], batch["x_mark_dec"])

    def loss(self, model, batch):
        pred = self.predict(model, batch)
        if pred.shape != batch["y"].shape:
            raise FormersError(f"forecast: the model returned {tuple(pred.shape)}, the target is "
                               f"{tuple(batch['y'].shape)} (batch, pred_len, c_out); check the model's c_out/pred_len")
        return F.mse_loss(pred, batch["y"])

    @torch.no_grad()
    def score(self, model: nn.Module, split: str = "test", limit: int | None = None,
              device: torch.device | str | None = None) -> dict[str, float]:
        """{split}_mse and {split}_mae: means over the first `limit` windows (all by default), steps and channels.
        Predicts under `fixed_rng` (seed 0, the caller's RNG states restored)."""
        was = model.training
        model.eval()
        n = self.num_windows(split) if limit is None else min(limit, self.num_windows(split))
        se = ae = 0.0
        count = 0
        with fixed_rng(_model_device(model, device)):
            for i in range(0, n, self.eval_batch_size):
                batch = self.windows(split, torch.arange(i, min(i + self.eval_batch_size, n)))
                if device is not None:
                    batch = {k: v.to(device) for k, v in batch.items()}
                err = (self.predict(model, batch).double() - batch["y"].double())
                se += float(err.square().sum())
                ae += float(err.abs().sum())
                count += err.numel()
        model.train(was)
        return {f"{split}_mse": se / max(count, 1), f"{split}_mae": ae / max(count, 1)}

    def evaluate(self, model, limit=None, split: str | None = None):
        """Val metrics (early stopping reads val_mse) and, with `eval_test`, test metrics; one split if given."""
        if split is not None:
            return self.score(model, split, limit)
        out = self.score(model, "val", limit)
        if self.eval_test:
            out.update(self.score(model, "test", limit))
        return out

    # -- forecasting a user's CSV --------------------------------------------------------------------------------
    def forecast_csv(self, model: nn.Module, path: str | Path, backtest: bool = False) -> dict[str, Any]:
        """Forecast from a user's CSV with this task's scaler (fitted on the run's training rows).

        backtest=False: the input is the CSV's last seq_len rows; the forecast covers the pred_len steps after its
        end (dates continue at the spacing of its last two rows). backtest=True: the input ends pred_len rows
        before the end, and the forecast is compared with those last rows (scaled MSE/MAE, as in training).
        Returns {"columns", "history_dates", "history" (seq_len, C_out), "dates", "forecast" (pred_len, C_out),
        "truth" (pred_len, C_out) or None, and with backtest "mse", "mae"}; values in the CSV's own units.
        Predicts under `fixed_rng` (seed 0, the caller's RNG states restored)."""
        self.prepare()
        dates, values, names = self._load(path)
        if names != self.columns:
            raise FormersError(f"forecast: {path} has columns {names} (target last); the run was trained on "
                               f"{self.columns}")
        s, p = self.seq_len, self.pred_len
        need = s + p if backtest else s
        if len(values) < need:
            raise FormersError(f"forecast: {path} has {len(values)} rows; this run needs at least {need} "
                               f"(seq_len {s}{' + pred_len ' + str(p) if backtest else ''})")
        end = len(values) - p if backtest else len(values)  # the input window is rows [end - s, end)
        if backtest:
            out_dates = dates[end:end + p]
        else:
            if len(dates) < 2:
                raise FormersError(f"forecast: {path} needs two rows to infer the time step")
            step = dates[-1] - dates[-2]
            out_dates = dates[-1] + step * np.arange(1, p + 1)
        rows = self._scale(values[end - s:end + p] if backtest else values[end - s:end])  # (s [+ p], C) scaled
        if not backtest:  # the future is unknown: zeros (the decoder input zeroes those steps anyway)
            rows = torch.cat([rows, torch.zeros(p, rows.shape[1])])
        marks = torch.from_numpy(time_features(np.concatenate([dates[end - s:end], out_dates]), self.freq))
        batch = self._assemble(rows, marks, torch.zeros(1, dtype=torch.long))  # one window: rows [0, s + p)
        was = model.training
        model.eval()
        with torch.no_grad(), fixed_rng(_model_device(model)):
            pred = self.predict(model, batch)[0].double().cpu().numpy()  # (p, C_out) scaled
        model.train(was)
        c_out = pred.shape[-1]
        mean, std = self.mean[-c_out:], self.std[-c_out:]
        result: dict[str, Any] = {
            "columns": names[-c_out:], "history_dates": dates[end - s:end], "history": values[end - s:end, -c_out:],
            "dates": out_dates, "forecast": pred * std + mean, "truth": None}
        if backtest:
            truth = values[end:end + p, -c_out:]
            err = pred - (truth - mean) / std
            result.update(truth=truth, mse=float((err ** 2).mean()), mae=float(np.abs(err).mean()))
        return result


def plot_forecast(result: dict[str, Any], out: str | Path, channel: int = -1, title: str = "") -> Path:
    """PNG of one window: the input history, the forecast and (backtest) the truth of one output channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=100)
    ax.plot(result["history_dates"], result["history"][:, channel], color="0.4", label="input")
    if result.get("truth") is not None:
        ax.plot(result["dates"], result["truth"][:, channel], color="tab:blue", label="truth")
    ax.plot(result["dates"], result["forecast"][:, channel], color="tab:orange", label="forecast")
    ax.set_ylabel(result["columns"][channel])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


__all__ = ["ForecastTask", "time_features", "read_csv_series", "read_csv_header", "plot_forecast", "default_csv",
           "fixed_rng", "FREQ_FEATURES"]

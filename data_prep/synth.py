"""A synthetic e-commerce world with a known ground truth.

Users, items (products and content) and ads carry hidden latent factors; every label of the impression log is drawn
from them, and the oracle table keeps the true probabilities and expectations, so a model can be scored against the
best achievable. Titles and ad texts are built from words tied to those factors, so text carries the signal that lets
never-seen items be ranked.

Generation is vectorised numpy, chunk by chunk (bounded memory), with one seed per chunk derived from `seed`:
the same config gives the same bytes.

A world can drift (all off by default, which leaves the default world as it was, byte for byte): users' tastes move
along a direction of their own (`taste_drift` latent units per day), items fade after launch (their popularity halves
every `item_half_life` days), and prices change (each item's price moves by `price_drift` in log units per day, up or
down, as conversions see it; the catalogue keeps the launch price). A model that never updates falls behind.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm import tqdm

from data_prep import words
from recsys_mtl.errors import InputError
from recsys_mtl.files import atomic_dir, atomic_write_text

USER_ID_OFFSET, ITEM_ID_OFFSET, AD_ID_OFFSET = 1, 1_000_001, 9_000_001
AD_SHARE = 0.15  # fraction of impressions that show an ad
NEW_ITEM_SHARE = 0.3  # fraction of items launched after day 0
NEW_ITEM_BOOST = 3.0  # popularity multiplier in an item's first days ("new arrivals")
HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 5, 4, 4, 5, 6, 8, 10, 10, 8, 5, 2], dtype=np.float64)


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and seed of a synthetic world."""

    impressions: int = 1_000_000
    users: int = 20_000
    items: int = 5_000
    ads: int = 500
    days: int = 14
    seed: int = 0
    latent_dim: int = 8
    chunk_rows: int = 500_000
    taste_drift: float = 0.0  # latent units a user's taste moves per day
    item_half_life: float = 0.0  # days for an item's popularity to halve after launch; 0: it never fades
    price_drift: float = 0.0  # log-price units an item's price moves per day (as conversions see it)

    def __post_init__(self) -> None:
        for name in ("taste_drift", "item_half_life", "price_drift"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("impressions", "users", "items", "ads", "latent_dim", "chunk_rows"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.days < 3:
            raise InputError(f"--days must be >= 3 (train, valid and test take whole days), got {self.days}")
        if self.items < 2 * len(words.PRODUCT_CATEGORIES):
            raise InputError(f"--items must be >= {2 * len(words.PRODUCT_CATEGORIES)}, got {self.items}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n indices drawn with probabilities given by a cumulative distribution. Returns [n] int64."""
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _brand_names(n: int, rng: np.random.Generator) -> list[str]:
    syllables = words.BRAND_SYLLABLES
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = "".join(syllables[i] for i in rng.integers(0, len(syllables), rng.integers(2, 4))).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


class World:
    """The hidden entities of a world: latent factors and the raw users / items / ads tables."""

    def __init__(self, cfg: WorldConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        k = cfg.latent_dim
        self.categories = [*words.PRODUCT_CATEGORIES, *words.CONTENT_TOPICS]
        num_product_cats = len(words.PRODUCT_CATEGORIES)
        self.centroids = rng.normal(0, 1, (len(self.categories), k))
        self._make_users(rng, k)
        self._make_items(rng, k, num_product_cats)
        self._make_ads(rng)
        drift = np.random.default_rng([cfg.seed, 1])  # a stream of its own: the world without drift is unchanged
        self.user_drift = drift.normal(0, 1, (cfg.users, k)) / math.sqrt(k)  # unit-length directions on average
        self.item_price_drift = drift.choice([-1.0, 1.0], cfg.items)

    def _make_users(self, rng: np.random.Generator, k: int) -> None:
        n = self.cfg.users
        self.user_age = _draw(_cdf(np.array([2.0, 3, 2.5, 1.5, 1])), rng, n)
        self.user_gender = _draw(_cdf(np.array([5.0, 4, 1])), rng, n)
        self.user_city = _draw(_cdf(1.0 / np.arange(1, 61)), rng, n)
        self.user_activity = _draw(_cdf(np.array([5.0, 3.5, 1.5])), rng, n)
        age_vecs, gender_vecs = rng.normal(0, 0.25, (5, k)), rng.normal(0, 0.2, (3, k))
        self.user_latent = rng.normal(0, 0.3, (n, k)) + age_vecs[self.user_age] + gender_vecs[self.user_gender]
        self.user_bias = rng.normal(0, 0.3, n) + np.array([-0.2, 0.0, 0.2])[self.user_activity]
        self.user_price_sensitivity = rng.normal(0, 0.4, n) + np.array([0.4, 0.2, 0.0, -0.1, -0.2])[self.user_age]
        self.user_rating_bias = rng.normal(0, 0.3, n)
        self.user_device = _draw(_cdf(np.array([4.0, 4, 2])), rng, n)
        self.user_weight = np.array([1.0, 4, 15])[self.user_activity] * rng.lognormal(0, 0.5, n)

    def _make_items(self, rng: np.random.Generator, k: int, num_product_cats: int) -> None:
        n, days = self.cfg.items, self.cfg.days
        num_brands = min(400, max(num_product_cats, n // 25))
        self.brands = _brand_names(num_brands, rng)
        brand_cat = np.concatenate([rng.permutation(num_product_cats), rng.integers(0, num_product_cats, num_brands)])
        brand_cat = np.sort(brand_cat[:num_brands])  # every category has a brand; brands grouped by category
        brand_start = np.searchsorted(brand_cat, np.arange(num_product_cats))
        brand_count = np.bincount(brand_cat, minlength=num_product_cats)
        brand_vec, brand_quality = rng.normal(0, 0.4, (num_brands, k)), rng.normal(0, 0.4, num_brands)
        brand_premium = rng.lognormal(0, 0.3, num_brands)

        is_content = rng.random(n) < 0.3
        product_cat = _draw(_cdf(1.0 / np.arange(1, num_product_cats + 1) ** 0.7), rng, n)
        topic = num_product_cats + rng.integers(0, len(words.CONTENT_TOPICS), n)
        category = np.where(is_content, topic, product_cat)
        brand = brand_start[product_cat] + (rng.random(n) * brand_count[product_cat]).astype(np.int64)
        variant = rng.integers(0, 3, n)

        p_attrs, c_attrs = list(words.PRODUCT_ATTRIBUTES), list(words.CONTENT_ATTRIBUTES)
        p_attr_vec = rng.normal(0, 0.4, (len(p_attrs), k))
        c_attr_vec = rng.normal(0, 0.4, (len(c_attrs), k))
        p_appeal, p_quality = np.array(list(words.PRODUCT_ATTRIBUTES.values())).T
        c_appeal, c_quality = np.array(list(words.CONTENT_ATTRIBUTES.values())).T
        attr1 = rng.integers(0, len(p_attrs), n)
        has_attr2 = rng.random(n) < 0.5
        attr2 = (attr1 + 1 + rng.integers(0, len(p_attrs) - 1, n)) % len(p_attrs)
        c_attr = rng.integers(0, len(c_attrs), n)

        product_latent = brand_vec[brand] + p_attr_vec[attr1] + has_attr2[:, None] * p_attr_vec[attr2]
        noise = rng.normal(0, 0.25, (n, k))
        self.item_latent = (
            self.centroids[category] + noise + np.where(is_content[:, None], c_attr_vec[c_attr], product_latent)
        )
        product_appeal = p_appeal[attr1] + has_attr2 * p_appeal[attr2] + 0.3 * brand_quality[brand]
        product_quality = brand_quality[brand] + p_quality[attr1] + has_attr2 * p_quality[attr2]
        self.item_appeal = np.where(is_content, c_appeal[c_attr], product_appeal)
        self.item_quality = np.where(is_content, c_quality[c_attr], product_quality) + rng.normal(0, 0.15, n)
        self.item_is_content = is_content
        self.item_category = category
        cat_price = rng.lognormal(3.5, 0.8, num_product_cats)
        price = cat_price[product_cat] * brand_premium[brand] * np.exp(0.5 * product_quality) * rng.lognormal(0, 0.3, n)
        self.item_relative_price = np.log(price / cat_price[product_cat])
        content_type = rng.integers(0, 2, n)
        length = np.where(content_type == 0, rng.lognormal(math.log(800), 0.5, n), rng.lognormal(math.log(300), 0.6, n))
        self.item_relative_length = np.log(length / np.where(content_type == 0, 800, 300))
        launched_late = rng.random(n) < NEW_ITEM_SHARE
        self.item_launch = np.where(launched_late, rng.integers(1, days, n), 0)
        self.item_popularity = rng.lognormal(0, 1.3, n) * np.exp(0.5 * self.item_appeal)
        self.item_brand = brand

        cats = self.categories
        titles = [
            f"{c_attrs[c_attr[i]].capitalize()} {words.CONTENT_TOPICS[cats[category[i]]][variant[i]]}"
            f" ({words.CONTENT_TYPES[content_type[i]]})"
            if is_content[i]
            else f"{self.brands[brand[i]]} {p_attrs[attr1[i]]}{' ' + p_attrs[attr2[i]] if has_attr2[i] else ''} "
            f"{words.PRODUCT_CATEGORIES[cats[category[i]]][variant[i]]}"
            for i in range(n)
        ]
        self.item_noun = [
            (words.CONTENT_TOPICS if is_content[i] else words.PRODUCT_CATEGORIES)[cats[category[i]]][variant[i]]
            for i in range(n)
        ]
        self.item_attr_word = [p_attrs[a] for a in attr1]
        self.items = pl.DataFrame(
            {
                "item_id": np.arange(n, dtype=np.int64) + ITEM_ID_OFFSET,
                "kind": np.where(is_content, "content", "product"),
                "category": [cats[c] for c in category],
                "brand": [None if is_content[i] else self.brands[brand[i]] for i in range(n)],
                "price": np.where(is_content, np.nan, np.round(price, 2)),
                "content_type": [words.CONTENT_TYPES[t] if is_content[i] else None for i, t in enumerate(content_type)],
                "length": np.where(is_content, np.round(length), np.nan),
                "launch_day": self.item_launch.astype(np.int32),
                "title": titles,
            }
        ).with_columns(pl.col("price").fill_nan(None), pl.col("length").fill_nan(None).cast(pl.Int32))

    def _make_ads(self, rng: np.random.Generator) -> None:
        n = self.cfg.ads
        products = np.flatnonzero(~self.item_is_content)
        self.ad_item = products[_draw(_cdf(self.item_popularity[products] ** 0.5), rng, n)]
        phrases = list(words.AD_PHRASES)
        phrase = rng.integers(0, len(phrases), n)
        self.ad_creative = np.array(list(words.AD_PHRASES.values()))[phrase] + rng.normal(0, 0.1, n)
        self.ad_bid = np.round(rng.lognormal(0, 0.5, n), 2)
        self.ad_launch = self.item_launch[self.ad_item] + rng.integers(0, 3, n)
        texts = [
            f"{phrases[phrase[i]].capitalize()} {self.brands[self.item_brand[j]]} {self.item_noun[j]}"
            f" - {self.item_attr_word[j]}"
            for i, j in enumerate(self.ad_item)
        ]
        self.ads = pl.DataFrame(
            {
                "ad_id": np.arange(n, dtype=np.int64) + AD_ID_OFFSET,
                "item_id": self.ad_item + ITEM_ID_OFFSET,
                "advertiser": [self.brands[self.item_brand[j]] for j in self.ad_item],
                "bid": self.ad_bid,
                "start_day": self.ad_launch.astype(np.int32),
                "ad_text": texts,
            }
        )

    @property
    def users(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "user_id": np.arange(self.cfg.users, dtype=np.int64) + USER_ID_OFFSET,
                "age_band": np.array(words.AGE_BANDS)[self.user_age],
                "gender": np.array(words.GENDERS)[self.user_gender],
                "city": [f"city_{c:02d}" for c in self.user_city],
                "activity": np.array(words.ACTIVITY_LEVELS)[self.user_activity],
            }
        )

    def impressions(
        self, day: int, n: int, first_id: int, rng: np.random.Generator
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Draw `n` impressions of `day`. Returns (impressions, oracle), both with n rows in the same order."""
        cfg = self.cfg
        users = _draw(_cdf(self.user_weight), rng, n)
        age = day - self.item_launch
        item_weight = self.item_popularity * (age >= 0) * np.where(age < 3, NEW_ITEM_BOOST, 1.0)
        if cfg.item_half_life > 0:
            item_weight = item_weight * 0.5 ** (np.maximum(age, 0) / cfg.item_half_life)
        organic = _draw(_cdf(item_weight), rng, n)
        live_ads = self.ad_bid * (self.ad_launch <= day)
        is_ad = (rng.random(n) < AD_SHARE) & (live_ads.sum() > 0)
        ads = _draw(_cdf(live_ads if live_ads.sum() > 0 else np.ones_like(live_ads)), rng, n)
        items = np.where(is_ad, self.ad_item[ads], organic)
        position = np.where(is_ad, rng.integers(1, 5, n), np.minimum(1 + rng.geometric(0.15, n), 50))
        hour = _draw(_cdf(HOUR_WEIGHTS), rng, n)
        device = np.where(rng.random(n) < 0.8, self.user_device[users], rng.integers(0, 3, n))

        u = self.user_latent[users] + cfg.taste_drift * day * self.user_drift[users]  # [n, k]
        relative_price = self.item_relative_price[items] + cfg.price_drift * day * self.item_price_drift[items]
        affinity = np.einsum("nk,nk->n", u, self.item_latent[items])
        click_logit = (
            -3.8
            + 0.8 * affinity
            + self.item_appeal[items]
            + self.user_bias[users]
            - 0.3 * np.log(position)
            + np.array([0.1, 0.0, -0.2])[device]
            + 0.15 * np.cos((hour - 20) * math.pi / 12)
            + np.where(is_ad, -0.2 + self.ad_creative[ads], 0.0)
        )
        p_click = _sigmoid(click_logit)
        content = self.item_is_content[items]
        quality = self.item_quality[items]
        conv_logit = np.where(
            content,
            -3.0 + 0.4 * affinity + 0.5 * quality,
            -1.9 + 0.5 * affinity + 0.8 * quality - self.user_price_sensitivity[users] * relative_price,
        )
        p_conv = _sigmoid(conv_logit)
        p_rating = _sigmoid(0.6 + 1.5 * quality + 0.3 * affinity + self.user_rating_bias[users])
        read_rate = np.exp(0.3 + 0.4 * affinity + 0.4 * quality + 0.3 * self.item_relative_length[items])

        click = rng.random(n) < p_click
        conversion = click & (rng.random(n) < p_conv)
        rating = 1 + rng.binomial(4, p_rating)
        reads = click * rng.poisson(read_rate)
        recent = self._recent_categories(u, rng)

        ids = np.arange(first_id, first_id + n, dtype=np.int64)
        impressions = pl.DataFrame(
            {
                "impression_id": ids,
                "ts": (day * 86400 + hour * 3600 + rng.integers(0, 3600, n)).astype(np.int64),
                "day": np.full(n, day, dtype=np.int32),
                "hour": hour.astype(np.int8),
                "user_id": users + USER_ID_OFFSET,
                "item_id": items + ITEM_ID_OFFSET,
                "ad_id": pl.Series(ads + AD_ID_OFFSET).scatter(np.flatnonzero(~is_ad), None),
                "position": position.astype(np.int16),
                "device": np.array(words.DEVICES)[device],
                "recent_categories": recent,
                "click": click.astype(np.int8),
                "conversion": conversion.astype(np.int8),
                "rating": pl.Series(rating.astype(np.int8)).scatter(np.flatnonzero(~conversion), None),
                "reads": pl.Series(reads.astype(np.int32)).scatter(np.flatnonzero(~content), None),
            }
        )
        oracle = pl.DataFrame(
            {
                "impression_id": ids,
                "p_click": p_click,
                "p_conversion": p_conv,
                "exp_rating": 1 + 4 * p_rating,
                "exp_reads": pl.Series(p_click * read_rate).scatter(np.flatnonzero(~content), None),
            }
        )
        return impressions, oracle

    def _recent_categories(self, user_latent: np.ndarray, rng: np.random.Generator) -> pl.Series:
        """The user's recently browsed categories: 0-5 names drawn without replacement from their preferences."""
        n, num_slots = len(user_latent), 5
        scores = (user_latent @ self.centroids.T).astype(np.float32)  # [n, C]
        scores += rng.gumbel(size=scores.shape).astype(np.float32)
        top = np.argpartition(-scores, num_slots, axis=1)[:, :num_slots]  # [n, 5] unordered
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        top = np.take_along_axis(top, order, 1)
        counts = np.minimum(rng.poisson(2.0, n), num_slots)
        keep = np.arange(num_slots) < counts[:, None]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        names = pa.array(self.categories).take(pa.array(top[keep]))
        return pl.Series("recent_categories", pa.ListArray.from_arrays(offsets, names))


def generate_world(out: Path, cfg: WorldConfig, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a synthetic world to `out`: users, items, ads, impressions/ and oracle/ parquet, and world.toml.

    Returns:
        The output folder.
    """
    seeds = np.random.SeedSequence(cfg.seed).spawn(2)
    world = World(cfg, np.random.default_rng(seeds[0]))
    per_day = np.full(cfg.days, cfg.impressions // cfg.days)
    per_day[: cfg.impressions % cfg.days] += 1
    chunks = [
        (day, min(cfg.chunk_rows, int(per_day[day]) - start))
        for day in range(cfg.days)
        for start in range(0, int(per_day[day]), cfg.chunk_rows)
    ]
    chunk_seeds = seeds[1].spawn(len(chunks))
    with atomic_dir(out, overwrite) as tmp:
        world.users.write_parquet(tmp / "users.parquet")
        world.items.write_parquet(tmp / "items.parquet")
        world.ads.write_parquet(tmp / "ads.parquet")
        (tmp / "impressions").mkdir()
        (tmp / "oracle").mkdir()
        first_id = 0
        bar = tqdm(total=cfg.impressions, desc="synth", unit="rows", unit_scale=True, disable=not progress)
        for part, ((day, n), seed) in enumerate(zip(chunks, chunk_seeds, strict=True)):
            impressions, oracle = world.impressions(day, n, first_id, np.random.default_rng(seed))
            impressions.write_parquet(tmp / "impressions" / f"part-{part:05d}.parquet")
            oracle.write_parquet(tmp / "oracle" / f"part-{part:05d}.parquet")
            first_id += n
            bar.update(n)
        bar.close()
        lines = [f"{key} = {value}" for key, value in asdict(cfg).items()]
        atomic_write_text(tmp / "world.toml", "# recsys-mtl synth parameters\n" + "\n".join(lines) + "\n")
    return out

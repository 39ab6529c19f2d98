-- Segment recommendations as one DuckDB SQL script: the warehouse baseline of bench/batch.py.
--
-- Implements the scoring of models/ (SPEC §3) on the same input files as the Beam job
-- (pipelines/batch_recommendations.py) and leaves one row per user in the table
-- `sql_recommendations` (user_id, email_lower, make, model, year, rec_part_1..4,
-- rec1_score..rec4_score, rec1_price..rec4_price, rec1_part_type..rec4_part_type, source).
--
-- Inputs: four views named src_catalog, src_fitment, src_users, src_events over the
-- world's files, and the variable `as_of`. bench/batch.py defines them; by hand, in the
-- duckdb CLI:
--     SET VARIABLE as_of = TIMESTAMPTZ '2026-02-28 23:56:48+00';
--     CREATE VIEW src_catalog AS SELECT * FROM read_parquet('bench/work/full_world/catalog.parquet');
--     ... (same for fitment, users, events) ...
--     .read bench/batch.sql
--
-- Measured agreement with the Beam job (bench/results/batch.json): identical four SKUs,
-- in order, for every one of the 495,000 users of the full world (seed 7), and for the
-- demo world; the approximations below never triggered there.
--
-- What it does, in the order of the Beam graph:
--   1. validate every table as models/contracts.py does (required fields, strip text,
--      finite non-negative prices/quantities, price 0 rejected, integer years <= 2100,
--      parseable RFC 3339 times, known event names, order events need an order_id,
--      e-mails need '@'); rows that fail are dropped (Beam dead-letters them);
--   2. catalogue conflicts: one row per SKU, the one with the smallest part_type (then the
--      other fields); fitment and event rows with an unknown SKU are dropped;
--   3. events deduplicated by event_id (earliest event_time); users deduplicated by
--      lower(email): latest updated_at, then lowest user_id (a missing updated_at counts
--      as 1970); one row per user_id among the survivors;
--   4. order lines = distinct (order_id, sku) at their earliest event time, decayed with a
--      30-day half-life relative to as_of (lines after as_of weigh nothing); popularity
--      per level make+model+year, make+model, make, global, keyed by the buyer's vehicle
--      (orders of unknown buyers count at the global level only);
--   5. shrinkage: rate_global = (w + k/n_catalogue)/(total + k), then for each finer level
--      rate_L = (w_L + k*rate_parent)/(total_L + k), k = 20 pseudo-orders (a level the
--      vehicle lacks, e.g. a NULL model, passes its parent's rate through unchanged);
--      base score = ln(1 + 10000*rate) + 0.25 when the part is not universal;
--   6. candidates = eligible SKUs (price >= 50, no 'refurbished' tag, no SVC-/SERVICE-/
--      INSTALL-/WARRANTY- prefix, https image, no low-value part type unless an exception)
--      that fit the user's (make, model, year) or are universal;
--   7. serving level = the most specific level whose segment has at least 4 candidates
--      ordered in it that the user did not buy in the last 365 days, else global;
--   8. the user's intent adds 1.0 (cart) or 0.5 (view) within 93 days; SKUs bought within
--      365 days are excluded; top 4 by (score desc, sku asc) with at most 2 per part_type
--      and 1 per variant group (a SKU without a group is its own group).
--
-- How the greedy selection of models/recommend.py is written in SQL (and where it is
-- approximate):
--   * greedy_pick walks the ranking and skips an item whose variant group is already
--     picked or whose part_type already has 2 picks. Here: keep the best item of each
--     variant group, then the best 2 of each part_type, then the best 4. This equals the
--     greedy walk whenever all SKUs of a variant group share one part_type (colour
--     variants do); if a group spans part types the SQL can drop an item the greedy walk
--     would have taken. APPROXIMATION 1.
--   * users without signals (nothing bought, carted or viewed among their candidates)
--     share their vehicle's pick, computed once per (vehicle, level) as in Beam;
--   * users with signals are ranked over a prefix (best PREFIX items of their vehicle at
--     their level) plus their boosted items, minus what they bought. Everything outside
--     the prefix ranks after the prefix's last item (lower score, or equal score and a
--     larger SKU) and carries no boost, so a pick completed inside the pool is exact; users whose pool yields fewer than 4 picks
--     are re-ranked over all candidates (second pass), as Beam does. Beam's prefix is
--     8*4 + (number bought); here it is a fixed 16, which only moves users to the second
--     pass, never changes an answer.
--   * SKUs, part types, variant groups, users and vehicles get integer ids first, so the
--     windows of the greedy pick sort integers; sid follows SKU order, so ties still go
--     to the smaller SKU as in Beam.
--   * Beam falls back to the next level when a level cannot produce 4 picks; the
--     candidate set is the same at every level, so (with approximation 1) a user who
--     cannot get 4 picks at the serving level gets none anywhere: such users are
--     left without a row, as Beam dead-letters them.
--   * floating point: sums are added in a different order than pandas and ln(1 + x)
--     replaces numpy's log1p, so two SKUs whose scores differ by a few ulps may swap.
--     APPROXIMATION 2.
--   * text is stripped of spaces only (Python strips all Unicode white space); in JSON
--     input a number given as a string is accepted (Beam rejects it as a wrong type).
--     APPROXIMATION 3 (the generated worlds do neither).
--   * an (order_id, sku) line reported under two user ids is credited to the user of its
--     earliest event (Beam joins order lines per user shard). Of two copies of one
--     event_id the earliest is kept (ties: any copy).
--   * duplicate conflicting catalogue rows with the same part_type are broken by the
--     other fields in SQL order (Beam: by their repr() text). APPROXIMATION 4.

SET TimeZone = 'UTC';

-- Configuration (models/config.py defaults).
SET VARIABLE half_life_days = 30.0;
SET VARIABLE popularity_scale = 10000.0;
SET VARIABLE shrinkage_orders = 20.0;
SET VARIABLE intent_window_days = 93;
SET VARIABLE cart_weight = 1.0;
SET VARIABLE view_weight = 0.5;
SET VARIABLE specific_bonus = 0.25;
SET VARIABLE min_price = 50.0;
SET VARIABLE recs_per_user = 4;
SET VARIABLE max_per_part_type = 2;
SET VARIABLE exclusion_days = 365;
SET VARIABLE prefix = 16;   -- ranking prefix for users with signals (see the header)

CREATE OR REPLACE TEMP MACRO clean_text(x) AS nullif(trim(CAST(x AS VARCHAR)), '');
-- A number that is present but invalid: not finite, < 0, > limit, or not integral when asked.
CREATE OR REPLACE TEMP MACRO bad_number(x, limit_value, integral) AS
    x IS NOT NULL AND (NOT isfinite(x) OR x < 0 OR x > limit_value
                       OR (integral AND x <> round(x)));

-- 1-2. Catalogue: validate, resolve conflicts, eligibility -----------------------------
CREATE OR REPLACE TEMP TABLE catalog AS
WITH typed AS (
    SELECT clean_text(sku) AS sku, clean_text(title) AS title, clean_text(part_type) AS part_type,
           clean_text(brand) AS brand, TRY_CAST(price AS DOUBLE) AS price,
           clean_text(image_url) AS image_url,
           list_transform(coalesce(TRY_CAST(tags AS VARCHAR[]), []), t -> lower(trim(t))) AS tags,
           coalesce(TRY_CAST(is_universal AS BOOLEAN), false) AS is_universal,
           clean_text(variant_group) AS variant_group
    FROM src_catalog
), valid AS (
    SELECT * FROM typed
    WHERE sku IS NOT NULL AND part_type IS NOT NULL AND price IS NOT NULL
      AND NOT bad_number(price, 1000000.0, false) AND price <> 0
), resolved AS (
    SELECT DISTINCT ON (sku) * FROM valid
    ORDER BY sku, part_type, title, brand, price, image_url, is_universal, variant_group
)
SELECT row_number() OVER (ORDER BY sku)::INT AS sid,   -- SKU order: ties go to the smaller SKU
       sku, part_type, price, image_url, is_universal,
       dense_rank() OVER (ORDER BY part_type)::INT AS ptid,
       dense_rank() OVER (ORDER BY coalesce('group:' || variant_group, sku))::INT AS vkid,
       price >= getvariable('min_price')
       AND NOT list_contains(tags, 'refurbished')
       AND NOT (starts_with(upper(sku), 'SVC-') OR starts_with(upper(sku), 'SERVICE-')
                OR starts_with(upper(sku), 'INSTALL-') OR starts_with(upper(sku), 'WARRANTY-'))
       AND coalesce(starts_with(lower(image_url), 'https://') AND length(image_url) > 8, false)
       AND NOT (lower(trim(part_type)) NOT IN ('engine bolt kit', 'distributor cap')
                AND regexp_matches(lower(trim(part_type)),
                    'gasket|bolt|decal|clamp|sticker|washer|o-ring|grommet|cap|clip'))
           AS eligible
FROM resolved;

SET VARIABLE n_catalogue = (SELECT count(*) FROM catalog);

-- Fitment: validated, known SKUs, one row per (sku, vehicle).
CREATE OR REPLACE TEMP TABLE fitment AS
WITH typed AS (
    SELECT clean_text(sku) AS sku, clean_text(make) AS make, clean_text(model) AS model,
           TRY_CAST(year AS DOUBLE) AS year
    FROM src_fitment
)
SELECT DISTINCT c.sid, t.make, t.model, CAST(t.year AS BIGINT) AS year
FROM typed t JOIN catalog c ON c.sku = t.sku
WHERE t.make IS NOT NULL AND t.model IS NOT NULL AND t.year IS NOT NULL
  AND NOT bad_number(t.year, 2100, true);

-- 3. Users: validated, one per lower(e-mail), one per user_id ----------------------------
CREATE OR REPLACE TEMP TABLE users AS
WITH typed AS (
    SELECT clean_text(user_id) AS user_id, clean_text(email) AS email,
           clean_text(make) AS make, clean_text(model) AS model,
           TRY_CAST(year AS DOUBLE) AS year_num, year IS NOT NULL AS year_given,
           TRY_CAST(updated_at AS TIMESTAMPTZ) AS updated_at,
           updated_at IS NOT NULL AS updated_given
    FROM src_users
), valid AS (
    SELECT user_id, lower(email) AS email_lower, make, model,
           CAST(year_num AS BIGINT) AS year,
           coalesce(updated_at, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS t
    FROM typed
    WHERE user_id IS NOT NULL AND email IS NOT NULL AND contains(email, '@')
      AND NOT (year_given AND year_num IS NULL) AND NOT bad_number(year_num, 2100, true)
      AND NOT (updated_given AND updated_at IS NULL)
), by_email AS (
    SELECT *, row_number() OVER (PARTITION BY email_lower ORDER BY t DESC, user_id) = 1
              AS email_keep
    FROM valid
)
SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY NOT email_keep, t DESC) = 1
          AS first_of_id
FROM by_email;

-- Events: validated, known SKUs, one per event_id (the earliest copy).
CREATE OR REPLACE TEMP TABLE events AS
WITH typed AS (
    SELECT clean_text(event_id) AS event_id, TRY_CAST(event_time AS TIMESTAMPTZ) AS event_time,
           clean_text(user_id) AS user_id, clean_text(event_name) AS event_name,
           clean_text(sku) AS sku, TRY_CAST(quantity AS DOUBLE) AS quantity,
           TRY_CAST(price AS DOUBLE) AS price, clean_text(order_id) AS order_id
    FROM src_events
), valid AS (
    SELECT t.event_id, t.event_time, t.user_id, t.event_name, c.sid, t.order_id
    FROM typed t JOIN catalog c ON c.sku = t.sku
    WHERE t.event_id IS NOT NULL AND t.event_time IS NOT NULL AND t.user_id IS NOT NULL
      AND t.event_name IN ('Viewed Product', 'Cart Update', 'Placed Order', 'Ordered Product',
                           'Consumer Website Order')
      AND NOT (t.event_name IN ('Placed Order', 'Ordered Product', 'Consumer Website Order')
               AND t.order_id IS NULL)
      AND NOT bad_number(t.quantity, 10000, true) AND NOT bad_number(t.price, 1000000.0, false)
), deduplicated AS (
    SELECT event_id, min(event_time) AS event_time,
           arg_min({'user_id': user_id, 'event_name': event_name, 'sid': sid,
                    'order_id': order_id}, event_time) AS e
    FROM valid GROUP BY event_id
)
SELECT event_id, event_time, e.user_id, e.event_name, e.sid, e.order_id FROM deduplicated;

-- 4. Order lines and decayed popularity per level ---------------------------------------
CREATE OR REPLACE TEMP TABLE order_lines AS
SELECT order_id, sid, min(event_time) AS event_time, arg_min(user_id, event_time) AS user_id
FROM events
WHERE event_name IN ('Placed Order', 'Ordered Product', 'Consumer Website Order')
GROUP BY order_id, sid;

CREATE OR REPLACE TEMP TABLE weighted_lines AS
WITH buyer AS (   -- the buyer's vehicle: the row kept for the e-mail first
    SELECT user_id, make, model, year FROM users
    QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY NOT email_keep, t DESC) = 1
)
SELECT l.sid, b.make, b.model, b.year,
       pow(0.5, ((epoch_us(getvariable('as_of')::TIMESTAMPTZ) - epoch_us(l.event_time)) / 1e6
                 / 86400.0) / getvariable('half_life_days')) AS w
FROM order_lines l LEFT JOIN buyer b USING (user_id)
WHERE l.event_time <= getvariable('as_of')::TIMESTAMPTZ;

CREATE OR REPLACE TEMP TABLE pop_global AS
SELECT sid, sum(w) AS w FROM weighted_lines GROUP BY sid;
CREATE OR REPLACE TEMP TABLE pop_make AS
SELECT make, sid, sum(w) AS w FROM weighted_lines WHERE make IS NOT NULL GROUP BY ALL;
CREATE OR REPLACE TEMP TABLE pop_mm AS
SELECT make, model, sid, sum(w) AS w FROM weighted_lines
WHERE make IS NOT NULL AND model IS NOT NULL GROUP BY ALL;
CREATE OR REPLACE TEMP TABLE pop_mmy AS
SELECT make, model, year, sid, sum(w) AS w FROM weighted_lines
WHERE make IS NOT NULL AND model IS NOT NULL AND year IS NOT NULL GROUP BY ALL;

SET VARIABLE total_global = (SELECT coalesce(sum(w), 0.0) FROM pop_global);

-- 5-6. Vehicles, candidates and their blended scores at every level --------------------
CREATE OR REPLACE TEMP TABLE vehicles AS
SELECT row_number() OVER (ORDER BY make, model, year)::INT AS vid, make, model, year,
       make IS NOT NULL AND model IS NOT NULL AND year IS NOT NULL AS has_mmy,
       make IS NOT NULL AND model IS NOT NULL AS has_mm,
       make IS NOT NULL AS has_make
FROM (SELECT DISTINCT make, model, year FROM users WHERE email_keep AND first_of_id);

CREATE OR REPLACE TEMP TABLE candidates AS
WITH eligible AS (SELECT * FROM catalog WHERE eligible),
fits AS (
    SELECT v.vid, f.sid FROM vehicles v
    JOIN fitment f ON f.make = v.make AND f.model = v.model AND f.year = v.year
    UNION
    SELECT v.vid, e.sid FROM vehicles v CROSS JOIN eligible e WHERE e.is_universal
)
SELECT f.vid, f.sid, e.ptid, e.vkid, NOT e.is_universal AS specific
FROM fits f JOIN eligible e USING (sid);

-- Levels are numbered 1 = make+model+year, 2 = make+model, 3 = make, 4 = global.
CREATE OR REPLACE TEMP TABLE scored AS
WITH totals_make AS (SELECT make, sum(w) AS total FROM pop_make GROUP BY ALL),
totals_mm AS (SELECT make, model, sum(w) AS total FROM pop_mm GROUP BY ALL),
totals_mmy AS (SELECT make, model, year, sum(w) AS total FROM pop_mmy GROUP BY ALL),
weights AS (
    SELECT c.vid, c.sid, c.ptid, c.vkid, c.specific,
           coalesce(g.w, 0.0) AS w_g, coalesce(pm.w, 0.0) AS w_make,
           coalesce(tm.total, 0.0) AS t_make,
           coalesce(pmm.w, 0.0) AS w_mm, coalesce(tmm.total, 0.0) AS t_mm,
           coalesce(pmmy.w, 0.0) AS w_mmy, coalesce(tmmy.total, 0.0) AS t_mmy
    FROM candidates c
    JOIN vehicles v USING (vid)
    LEFT JOIN pop_global g ON g.sid = c.sid
    LEFT JOIN pop_make pm ON pm.make = v.make AND pm.sid = c.sid
    LEFT JOIN totals_make tm ON tm.make = v.make
    LEFT JOIN pop_mm pmm ON pmm.make = v.make AND pmm.model = v.model AND pmm.sid = c.sid
    LEFT JOIN totals_mm tmm ON tmm.make = v.make AND tmm.model = v.model
    LEFT JOIN pop_mmy pmmy ON pmmy.make = v.make AND pmmy.model = v.model
                           AND pmmy.year = v.year AND pmmy.sid = c.sid
    LEFT JOIN totals_mmy tmmy ON tmmy.make = v.make AND tmmy.model = v.model
                              AND tmmy.year = v.year
), rate_g AS (
    SELECT *, (w_g + getvariable('shrinkage_orders') * (1.0 / getvariable('n_catalogue')))
              / (getvariable('total_global') + getvariable('shrinkage_orders')) AS r_g
    FROM weights
), rate_make AS (
    SELECT *, (w_make + getvariable('shrinkage_orders') * r_g)
              / (t_make + getvariable('shrinkage_orders')) AS r_make FROM rate_g
), rate_mm AS (
    SELECT *, (w_mm + getvariable('shrinkage_orders') * r_make)
              / (t_mm + getvariable('shrinkage_orders')) AS r_mm FROM rate_make
), rate_mmy AS (
    SELECT *, (w_mmy + getvariable('shrinkage_orders') * r_mm)
              / (t_mmy + getvariable('shrinkage_orders')) AS r_mmy FROM rate_mm
)
SELECT vid, sid, ptid, vkid,
       w_mmy > 0 AS obs_1, w_mm > 0 AS obs_2, w_make > 0 AS obs_3,
       ln(1 + least(greatest(r_mmy, 0.0), 1.0) * getvariable('popularity_scale'))
           + getvariable('specific_bonus') * specific::INT AS base_1,
       ln(1 + least(greatest(r_mm, 0.0), 1.0) * getvariable('popularity_scale'))
           + getvariable('specific_bonus') * specific::INT AS base_2,
       ln(1 + least(greatest(r_make, 0.0), 1.0) * getvariable('popularity_scale'))
           + getvariable('specific_bonus') * specific::INT AS base_3,
       ln(1 + least(greatest(r_g, 0.0), 1.0) * getvariable('popularity_scale'))
           + getvariable('specific_bonus') * specific::INT AS base_4
FROM rate_mmy;

-- 7. Users, their signals and their serving level ---------------------------------------
CREATE OR REPLACE TEMP TABLE targets AS
SELECT row_number() OVER (ORDER BY u.user_id)::INT AS uid,
       u.user_id, u.email_lower, u.make, u.model, u.year, v.vid
FROM users u JOIN vehicles v
  ON v.make IS NOT DISTINCT FROM u.make AND v.model IS NOT DISTINCT FROM u.model
 AND v.year IS NOT DISTINCT FROM u.year
WHERE u.email_keep AND u.first_of_id;

-- Signals on the user's own candidates: bought (excluded) and boosted (intent).
CREATE OR REPLACE TEMP TABLE signals AS
WITH bought AS (
    SELECT DISTINCT user_id, sid, true AS bought, 0.0 AS boost FROM order_lines
    WHERE event_time >= getvariable('as_of')::TIMESTAMPTZ
                        - to_days(getvariable('exclusion_days')::INT)
      AND event_time <= getvariable('as_of')::TIMESTAMPTZ
), intent AS (
    SELECT user_id, sid, false AS bought,
           max(CASE event_name WHEN 'Cart Update' THEN getvariable('cart_weight')
                               ELSE getvariable('view_weight') END) AS boost
    FROM events
    WHERE event_name IN ('Cart Update', 'Viewed Product')
      AND event_time >= getvariable('as_of')::TIMESTAMPTZ
                        - to_days(getvariable('intent_window_days')::INT)
      AND event_time <= getvariable('as_of')::TIMESTAMPTZ
    GROUP BY ALL
), both_kinds AS (
    SELECT user_id, sid, bool_or(bought) AS bought, max(boost) AS boost
    FROM (SELECT * FROM bought UNION ALL SELECT * FROM intent) GROUP BY ALL
)
SELECT t.uid, t.vid, x.sid, x.bought, x.boost, s.obs_1, s.obs_2, s.obs_3
FROM both_kinds x
JOIN targets t USING (user_id)
JOIN scored s ON s.vid = t.vid AND s.sid = x.sid;

CREATE OR REPLACE TEMP TABLE user_levels AS
WITH support AS (
    SELECT vid, sum(obs_1::INT) AS s_1, sum(obs_2::INT) AS s_2, sum(obs_3::INT) AS s_3
    FROM scored GROUP BY vid
), per_user AS (
    SELECT uid, sum((bought AND obs_1)::INT) AS x_1, sum((bought AND obs_2)::INT) AS x_2,
           sum((bought AND obs_3)::INT) AS x_3
    FROM signals GROUP BY uid
)
SELECT t.uid, t.vid, p.uid IS NOT NULL AS has_signal,
       CASE WHEN v.has_mmy AND coalesce(s.s_1, 0) - coalesce(p.x_1, 0)
                               >= getvariable('recs_per_user') THEN 1
            WHEN v.has_mm AND coalesce(s.s_2, 0) - coalesce(p.x_2, 0)
                              >= getvariable('recs_per_user') THEN 2
            WHEN v.has_make AND coalesce(s.s_3, 0) - coalesce(p.x_3, 0)
                                >= getvariable('recs_per_user') THEN 3
            ELSE 4 END AS level
FROM targets t JOIN vehicles v USING (vid)
LEFT JOIN support s USING (vid)
LEFT JOIN per_user p USING (uid);

-- 8. Rankings per (vehicle, level) and the greedy pick ----------------------------------
CREATE OR REPLACE TEMP TABLE ranked AS
WITH needed AS (SELECT DISTINCT vid, level FROM user_levels)
SELECT *, row_number() OVER (PARTITION BY vid, level ORDER BY base DESC, sid)::INT AS rk
FROM (
    SELECT n.level, s.vid, s.sid, s.ptid, s.vkid,
           CASE n.level WHEN 1 THEN s.base_1 WHEN 2 THEN s.base_2
                        WHEN 3 THEN s.base_3 ELSE s.base_4 END AS base
    FROM scored s JOIN needed n USING (vid)
);

-- Greedy pick over a pool (key, sid, ptid, vkid, score): best of each variant group, then
-- the best max_per_part_type of each part type, then the best recs_per_user.
CREATE OR REPLACE TEMP MACRO greedy_picks(pool_table) AS TABLE
WITH one_per_variant AS (
    SELECT * FROM query_table(pool_table)
    QUALIFY row_number() OVER (PARTITION BY key, vkid ORDER BY score DESC, sid) = 1
), capped AS (
    SELECT * FROM one_per_variant
    QUALIFY row_number() OVER (PARTITION BY key, ptid ORDER BY score DESC, sid)
            <= getvariable('max_per_part_type')
)
SELECT key, level, sid, score,
       row_number() OVER (PARTITION BY key ORDER BY score DESC, sid) AS pos
FROM capped
QUALIFY pos <= getvariable('recs_per_user');

-- Shared pick of users without signals: greedy over the whole ranking of (vehicle, level).
CREATE OR REPLACE TEMP TABLE pool_default AS
WITH needed AS (SELECT DISTINCT vid, level FROM user_levels WHERE NOT has_signal)
SELECT r.vid * 8 + r.level AS key, r.level, r.sid, r.ptid, r.vkid, r.base AS score
FROM ranked r SEMI JOIN needed n ON n.vid = r.vid AND n.level = r.level;

CREATE OR REPLACE TEMP TABLE default_picks AS SELECT * FROM greedy_picks('pool_default');

-- Personal pick: prefix of the ranking plus boosted items, minus bought items.
CREATE OR REPLACE TEMP TABLE pool_prefix AS
WITH users_with AS (SELECT uid, vid, level FROM user_levels WHERE has_signal),
prefix AS (
    SELECT u.uid, u.level, r.sid, r.ptid, r.vkid, r.base
    FROM users_with u
    JOIN (SELECT * FROM ranked WHERE rk <= getvariable('prefix')) r
      ON r.vid = u.vid AND r.level = u.level
), boosted AS (
    SELECT u.uid, u.level, r.sid, r.ptid, r.vkid, r.base
    FROM users_with u
    JOIN signals s ON s.uid = u.uid AND s.boost > 0 AND NOT s.bought
    JOIN ranked r ON r.vid = u.vid AND r.level = u.level AND r.sid = s.sid
    WHERE r.rk > getvariable('prefix')
), pool AS (SELECT * FROM prefix UNION ALL SELECT * FROM boosted)
SELECT p.uid AS key, p.level, p.sid, p.ptid, p.vkid, p.base + coalesce(s.boost, 0.0) AS score
FROM pool p LEFT JOIN signals s ON s.uid = p.uid AND s.sid = p.sid
WHERE NOT coalesce(s.bought, false);

CREATE OR REPLACE TEMP TABLE personal AS SELECT * FROM greedy_picks('pool_prefix');

-- Second pass: users whose prefix pool gave fewer than 4 picks, over all their candidates.
CREATE OR REPLACE TEMP TABLE pool_full AS
WITH short AS (
    SELECT u.uid, u.vid, u.level FROM user_levels u
    LEFT JOIN (SELECT key AS uid, count(*) AS n FROM personal GROUP BY ALL) p USING (uid)
    WHERE u.has_signal AND coalesce(p.n, 0) < getvariable('recs_per_user')
)
SELECT u.uid AS key, u.level, r.sid, r.ptid, r.vkid, r.base + coalesce(s.boost, 0.0) AS score
FROM short u JOIN ranked r ON r.vid = u.vid AND r.level = u.level
LEFT JOIN signals s ON s.uid = u.uid AND s.sid = r.sid
WHERE NOT coalesce(s.bought, false);

DELETE FROM personal WHERE key IN (SELECT DISTINCT key FROM pool_full);
INSERT INTO personal SELECT * FROM greedy_picks('pool_full');

-- One row per served user ---------------------------------------------------------------
CREATE OR REPLACE TEMP TABLE picks AS
WITH by_user AS (
    SELECT u.uid, d.level, d.sid, d.score, d.pos
    FROM user_levels u JOIN default_picks d ON d.key = u.vid * 8 + u.level
    WHERE NOT u.has_signal
    UNION ALL
    SELECT key AS uid, level, sid, score, pos FROM personal
)
SELECT uid, any_value(level) AS level,
       max(sid) FILTER (pos = 1) AS s1, max(sid) FILTER (pos = 2) AS s2,
       max(sid) FILTER (pos = 3) AS s3, max(sid) FILTER (pos = 4) AS s4,
       max(score) FILTER (pos = 1) AS rec1_score, max(score) FILTER (pos = 2) AS rec2_score,
       max(score) FILTER (pos = 3) AS rec3_score, max(score) FILTER (pos = 4) AS rec4_score
FROM by_user GROUP BY uid
HAVING count(*) = getvariable('recs_per_user');

CREATE OR REPLACE TABLE sql_recommendations AS
SELECT t.user_id, t.email_lower, t.make, t.model, t.year,
       c1.sku AS rec_part_1, c2.sku AS rec_part_2, c3.sku AS rec_part_3, c4.sku AS rec_part_4,
       c1.price AS rec1_price, c2.price AS rec2_price, c3.price AS rec3_price,
       c4.price AS rec4_price,
       p.rec1_score, p.rec2_score, p.rec3_score, p.rec4_score,
       c1.part_type AS rec1_part_type, c2.part_type AS rec2_part_type,
       c3.part_type AS rec3_part_type, c4.part_type AS rec4_part_type,
       ['make+model+year', 'make+model', 'make', 'global'][p.level] AS source
FROM picks p JOIN targets t USING (uid)
JOIN catalog c1 ON c1.sid = p.s1 JOIN catalog c2 ON c2.sid = p.s2
JOIN catalog c3 ON c3.sid = p.s3 JOIN catalog c4 ON c4.sid = p.s4;

-- The outbox table services write to (README, "Use it in your service"). Left as it is when
-- it already exists (for example a Debezium-style table with other column names): only the
-- relay's bookkeeping is added, by the migrations after this one.
CREATE TABLE IF NOT EXISTS {{table}} (
    {{id}}             uuid        PRIMARY KEY,
    {{aggregate_type}} text        NOT NULL,
    {{aggregate_id}}   text        NOT NULL,
    {{event_type}}     text        NOT NULL,
    {{payload}}        jsonb       NOT NULL,
    {{headers}}        jsonb       NOT NULL DEFAULT '{}',
    {{traceparent}}    text,
    {{tracestate}}     text,
    {{created_at}}     timestamptz NOT NULL DEFAULT now()
);

-- The tables tansu 0.6's PostgreSQL storage engine (`--storage-engine postgres://...`) reads and
-- writes. tansu does not create them itself; `scripts/services kafka-cluster` applies this file
-- to the database `tansu` before it starts the brokers, and every statement is idempotent, so it
-- runs on each call. Written for this project from the statements tansu sends (its SQL and the
-- Rust types it binds): names and types must match those, constraints are ours. Three brokers of
-- one cluster share these rows, so a broker can be killed and restarted without losing the log.
--
-- Types follow what tansu binds: partitions and topition ids are int4, offsets and producer ids
-- int8, producer epochs int2, keys/values/header parts bytea. Every ON CONFLICT in tansu's SQL
-- has the unique constraint it names here; `last_updated` gets a default because its upserts
-- set it from `excluded.last_updated`.
--
-- A cluster is one `--cluster-id`: every other row hangs off it.

create table if not exists cluster (
    id           integer     generated always as identity primary key,
    name         text        not null unique,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now()
);

create table if not exists topic (
    id                 integer     generated always as identity primary key,
    cluster            integer     not null references cluster (id),
    name               text        not null,
    uuid               uuid        not null unique,
    partitions         integer     not null,
    replication_factor integer     not null,
    is_internal        boolean     not null default false,
    last_updated       timestamptz not null default now(),
    created_at         timestamptz not null default now(),
    -- tansu answers TOPIC_ALREADY_EXISTS on a unique violation of this insert
    unique (cluster, name)
);

create table if not exists topic_configuration (
    id           integer     generated always as identity primary key,
    topic        integer     not null references topic (id),
    name         text        not null,
    value        text,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    unique (topic, name)
);

-- One partition of a topic ("topic" + "partition").
create table if not exists topition (
    id           integer     generated always as identity primary key,
    topic        integer     not null references topic (id),
    partition    integer     not null,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    unique (topic, partition)
);

-- A partition's log start (low) and next offset (high); produce locks this row (FOR NO KEY
-- UPDATE), which is what keeps two brokers writing one partition from taking the same offsets.
create table if not exists watermark (
    id           integer     generated always as identity primary key,
    topition     integer     not null unique references topition (id),
    low          bigint,
    high         bigint,
    stable       bigint,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now()
);

create table if not exists record (
    topition       integer     not null references topition (id),
    offset_id      bigint      not null,
    attributes     smallint,
    producer_id    bigint,
    producer_epoch smallint,
    timestamp      timestamptz,
    k              bytea,
    v              bytea,
    -- the writing transaction: tansu's fetch compares it with the snapshot's xmin
    transaction_id xid8        not null default pg_current_xact_id(),
    last_updated   timestamptz not null default now(),
    created_at     timestamptz not null default now(),
    primary key (topition, offset_id)
);

-- Record headers: a key may repeat within one record, so (topition, offset_id) is no key here.
create table if not exists header (
    id           bigint      generated always as identity primary key,
    topition     integer     not null,
    offset_id    bigint      not null,
    k            bytea,
    v            bytea,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    foreign key (topition, offset_id) references record (topition, offset_id)
);
create index if not exists header_record on header (topition, offset_id);

-- Idempotent (and transactional) producers: the id, its epochs, and per partition the next
-- sequence number expected from an epoch. Kept here, so a producer may move between brokers.
create table if not exists producer (
    id           bigint      generated always as identity primary key,
    cluster      integer     not null references cluster (id),
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now()
);

create table if not exists producer_epoch (
    id           integer     generated always as identity primary key,
    producer     bigint      not null references producer (id),
    epoch        smallint    not null,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    unique (producer, epoch)
);

create table if not exists producer_detail (
    id             integer     generated always as identity primary key,
    producer_epoch integer     not null references producer_epoch (id),
    topition       integer     not null references topition (id),
    sequence       integer     not null default 0,
    last_updated   timestamptz not null default now(),
    created_at     timestamptz not null default now(),
    unique (producer_epoch, topition)
);

create table if not exists consumer_group (
    id           integer     generated always as identity primary key,
    cluster      integer     not null references cluster (id),
    name         text        not null,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    unique (cluster, name)
);

-- The group's state as a JSON document, replaced under an e-tag compare.
create table if not exists consumer_group_detail (
    id             integer     generated always as identity primary key,
    consumer_group integer     not null unique references consumer_group (id),
    e_tag          uuid        not null,
    detail         jsonb       not null,
    last_updated   timestamptz not null default now(),
    created_at     timestamptz not null default now()
);

create table if not exists consumer_offset (
    id               integer     generated always as identity primary key,
    consumer_group   integer     not null references consumer_group (id),
    topition         integer     not null references topition (id),
    committed_offset bigint      not null,
    leader_epoch     integer,
    timestamp        timestamptz,
    metadata         text,
    last_updated     timestamptz not null default now(),
    created_at       timestamptz not null default now(),
    unique (consumer_group, topition)
);

create table if not exists scram_credential (
    id           integer     generated always as identity primary key,
    cluster      integer     not null references cluster (id),
    username     text        not null,
    mechanism    integer     not null,
    salt         bytea       not null,
    iterations   integer     not null,
    stored_key   bytea       not null,
    server_key   bytea       not null,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    unique (cluster, username, mechanism)
);

-- Transactions (transactional.id): not used by the relay, whose producer is idempotent but not
-- transactional; here so that tansu's statements for them find their tables.
create table if not exists txn (
    id           integer     generated always as identity primary key,
    cluster      integer     not null references cluster (id),
    name         text        not null,
    producer     bigint      not null references producer (id),
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now(),
    unique (cluster, name)
);

create table if not exists txn_detail (
    id                     integer     generated always as identity primary key,
    "transaction"          integer     not null references txn (id),
    producer_epoch         integer     not null references producer_epoch (id),
    transaction_timeout_ms integer     not null,
    started_at             timestamptz,
    status                 text,
    last_updated           timestamptz not null default now(),
    created_at             timestamptz not null default now()
);

create table if not exists txn_topition (
    id           integer     generated always as identity primary key,
    txn_detail   integer     not null references txn_detail (id),
    topition     integer     not null references topition (id),
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now()
);

create table if not exists txn_produce_offset (
    id           integer     generated always as identity primary key,
    txn_topition integer     not null unique references txn_topition (id),
    offset_start bigint      not null,
    offset_end   bigint      not null,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now()
);

create table if not exists txn_offset_commit (
    id             integer     generated always as identity primary key,
    txn_detail     integer     not null references txn_detail (id),
    consumer_group integer     not null references consumer_group (id),
    generation_id  integer,
    member_id      text,
    last_updated   timestamptz not null default now(),
    created_at     timestamptz not null default now()
);

create table if not exists txn_offset_commit_tp (
    id               integer     generated always as identity primary key,
    offset_commit    integer     not null references txn_offset_commit (id),
    topition         integer     not null references topition (id),
    committed_offset bigint      not null,
    leader_epoch     integer,
    metadata         text,
    last_updated     timestamptz not null default now(),
    created_at       timestamptz not null default now()
);

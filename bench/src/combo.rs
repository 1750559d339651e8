//! The source × sink combinations. Every phase measures each one under the same load, so the
//! report compares the two sources (poll, wal) on both brokers rather than one set-up alone.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceKind {
    Poll,
    Wal,
}

impl SourceKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SourceKind::Poll => "poll",
            SourceKind::Wal => "wal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SinkKind {
    Kafka,
    Rabbitmq,
}

impl SinkKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Rabbitmq => "rabbitmq",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Combo {
    pub(crate) source: SourceKind,
    pub(crate) sink: SinkKind,
}

impl Combo {
    pub(crate) const ALL: [Combo; 4] = [
        Combo {
            source: SourceKind::Wal,
            sink: SinkKind::Kafka,
        },
        Combo {
            source: SourceKind::Poll,
            sink: SinkKind::Kafka,
        },
        Combo {
            source: SourceKind::Wal,
            sink: SinkKind::Rabbitmq,
        },
        Combo {
            source: SourceKind::Poll,
            sink: SinkKind::Rabbitmq,
        },
    ];

    /// `wal-kafka`: for names of databases, slots, topics, files.
    pub(crate) fn label(self) -> String {
        format!("{}_{}", self.source.as_str(), self.sink.as_str())
    }

    /// `wal → kafka`: for the report.
    pub(crate) fn title(self) -> String {
        format!("{} → {}", self.source.as_str(), self.sink.as_str())
    }
}

//! OpenTelemetry across the services: the W3C trace context travels in Kafka record headers,
//! so one trace follows a top-up from the balance event through the evaluator, the payment
//! worker and the notifier; and a service exports its spans and metrics over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::{SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use topup_proto::topics;
use topup_proto::v1::{
    DeliveryReceipt, DeliveryStatus, NotificationCommand, NotificationKind, RuleState,
};
use topup_tests::otlp_sink::OtlpSink;
use topup_tests::{rule, Platform, PARTITIONS, WAIT};

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

/// The `process <topic>` span of `group`'s consumer in `trace`.
fn processed<'s>(
    spans: &'s [SpanData],
    trace: TraceId,
    topic: &str,
    group: &str,
) -> Option<&'s SpanData> {
    spans.iter().find(|s| {
        s.span_context.trace_id() == trace
            && s.name == format!("process {topic}")
            && s.span_kind == SpanKind::Consumer
            && attribute(s, "messaging.consumer.group.name").as_deref() == Some(group)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_top_up_through_all_three_services() -> anyhow::Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    topup_kafka::telemetry::install_tracer_provider(provider.clone());
    let platform = Platform::start()?;
    let evaluator = topup_evaluator::Config::new(platform.kafka.clone()).group_id;
    let worker = topup_payment_worker::Config::new(platform.kafka.clone()).group_id;
    let notifier = topup_notifier::Config::new(platform.kafka.clone()).group_id;

    platform.publish_rule(rule("sub-traced", "tok_approve_4242", RuleState::Active)).await?;
    // The rule first: a rule that arrives after the low balance fires the top-up itself,
    // in the rule record's trace (right, but not the journey this test follows).
    platform
        .reader::<NotificationCommand>(topics::NOTIFICATIONS)?
        .wait_for("the rule activated", |n| n.kind == NotificationKind::RuleActivated as i32)
        .await?;
    platform.publish_balance("sub-traced", 800, 1).await?;
    let mut receipts = platform.reader::<DeliveryReceipt>(topics::DELIVERIES)?;
    receipts
        .wait_for("the success notification delivered", |r| {
            r.subscriber_id == "sub-traced"
                && r.kind == NotificationKind::TopUpSucceeded as i32
                && r.status == DeliveryStatus::Delivered as i32
        })
        .await?;

    // The balance event arrived without a trace context: the evaluator's span is the root.
    // Everything the top-up caused must carry on in that trace. (The receipt can be read a
    // moment before the notifier ends its span: wait for the span, within WAIT.)
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(50));
    let spans = loop {
        every.tick().await;
        provider.force_flush()?;
        let spans = exporter.get_finished_spans()?;
        let root = spans.iter().find(|s| {
            s.name == format!("process {}", topics::BALANCE)
                && attribute(s, "messaging.kafka.message.key").as_deref() == Some("sub-traced")
        });
        if let Some(root) = root {
            let trace = root.span_context.trace_id();
            if processed(&spans, trace, topics::NOTIFICATIONS, &notifier).is_some()
                && spans.iter().filter(|s| s.span_context.trace_id() == trace).count() >= 8
            {
                break spans;
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no complete trace within {WAIT:?}; spans: {:#?}",
            spans.iter().map(|s| (&s.name, s.span_context.trace_id())).collect::<Vec<_>>()
        );
    };
    let root = spans
        .iter()
        .find(|s| {
            s.name == format!("process {}", topics::BALANCE)
                && attribute(s, "messaging.kafka.message.key").as_deref() == Some("sub-traced")
        })
        .context("the evaluator's span")?;
    let trace = root.span_context.trace_id();
    assert!(!root.parent_span_id.to_string().chars().any(|c| c != '0'), "a root span");
    assert_eq!(attribute(root, "messaging.system").as_deref(), Some("kafka"));
    assert_eq!(attribute(root, "messaging.destination.name").as_deref(), Some(topics::BALANCE));
    assert_eq!(attribute(root, "messaging.consumer.group.name").as_deref(), Some(&*evaluator));

    // Evaluator → payment worker: the command's send span is the parent of the worker's
    // process span.
    let command_sent = spans
        .iter()
        .find(|s| {
            s.span_context.trace_id() == trace
                && s.name == format!("send {}", topics::COMMANDS)
                && s.span_kind == SpanKind::Producer
        })
        .context("the evaluator's send span for the command")?;
    assert_eq!(command_sent.parent_span_id, root.span_context.span_id());
    let charged = processed(&spans, trace, topics::COMMANDS, &worker)
        .context("the payment worker's span in the same trace")?;
    assert_eq!(charged.parent_span_id, command_sent.span_context.span_id());

    // Payment worker → notifier (the success notification) and → evaluator (the result).
    let notified = processed(&spans, trace, topics::NOTIFICATIONS, &notifier)
        .context("the notifier's span in the same trace")?;
    let parent = spans
        .iter()
        .find(|s| s.span_context.span_id() == notified.parent_span_id)
        .context("the notifier's span has a parent in the trace")?;
    assert_eq!(parent.name, format!("send {}", topics::NOTIFICATIONS));
    processed(&spans, trace, topics::RESULTS, &evaluator)
        .context("the evaluator's span for the result in the same trace")?;

    let groups: BTreeSet<String> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .filter_map(|s| attribute(s, "messaging.consumer.group.name"))
        .collect();
    for group in [&evaluator, &worker, &notifier] {
        assert!(groups.contains(group), "{group} missing from the trace: {groups:?}");
    }
    platform.stop().await?;
    let _ = provider.shutdown();
    Ok(())
}

/// The trace ids in the `traceparent` headers of every record on `topic`, by record key.
async fn traceparents(platform: &Platform, topic: &str) -> anyhow::Result<Vec<(String, String)>> {
    let consumer: StreamConsumer = platform.kafka.reader().create()?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, partition, WAIT)?;
        ends.push(high);
    }
    consumer.assign(&assignment)?;
    let mut found = Vec::new();
    // The consumer's position moves past transaction markers too, which never arrive as
    // messages: the end is reached when every position is at its partition's end.
    let done = |consumer: &StreamConsumer| -> anyhow::Result<bool> {
        let positions = consumer.position()?;
        Ok((0..PARTITIONS).zip(&ends).all(|(partition, end)| {
            let at = positions.find_partition(topic, partition).map(|p| p.offset());
            *end == 0 || matches!(at, Some(Offset::Offset(n)) if n >= *end)
        }))
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(&consumer)? {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{topic} not read to its end");
        let Ok(message) =
            tokio::time::timeout(std::time::Duration::from_millis(100), consumer.recv()).await
        else {
            continue;
        };
        let message = message?;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).to_string();
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                if header.key == "traceparent" {
                    let value = String::from_utf8_lossy(header.value.unwrap_or_default());
                    // 00-<trace id>-<span id>-<flags>
                    let trace = value.split('-').nth(1).unwrap_or_default().to_string();
                    found.push((key.clone(), trace));
                }
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exports_spans_and_metrics_over_otlp_when_told_where() -> anyhow::Result<()> {
    let sink = OtlpSink::start().await?;
    let platform = Platform::cluster()?;
    let mut child = topup_tests::child_command(env!("CARGO_BIN_EXE_evaluator_child"))
        .env("KAFKA_BROKERS", &platform.kafka.brokers)
        .env("KAFKA_MOCK_CLUSTER", platform.kafka.mock_cluster.to_string())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &sink.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting the evaluator")?;

    platform.publish_rule(rule("sub-otlp", "tok_ok", RuleState::Active)).await?;
    platform
        .reader::<NotificationCommand>(topics::NOTIFICATIONS)?
        .wait_for("the rule activated", |n| n.kind == NotificationKind::RuleActivated as i32)
        .await?;
    platform.publish_balance("sub-otlp", 800, 1).await?;
    sink.wait_until("the evaluator's span for the balance and its metrics", |spans, points| {
        spans.iter().any(|s| {
            s.name == format!("process {}", topics::BALANCE)
                && s.attribute("messaging.kafka.message.key") == Some("sub-otlp")
        }) && points.iter().any(|(_, name, value)| name == "topup_topups_issued" && value == "1")
    })
    .await?;

    let spans = sink.spans();
    let root = spans
        .iter()
        .find(|s| {
            s.name == format!("process {}", topics::BALANCE)
                && s.attribute("messaging.kafka.message.key") == Some("sub-otlp")
        })
        .context("the evaluator's span")?;
    assert_eq!(root.service, "topup-evaluator", "service.name of the resource");
    assert_eq!(root.attribute("messaging.system"), Some("kafka"));
    assert_eq!(root.attribute("messaging.operation.type"), Some("process"));
    assert_eq!(root.attribute("messaging.destination.name"), Some(topics::BALANCE));
    // The command on the topic carries the trace on to the payment worker.
    let commands = traceparents(&platform, topics::COMMANDS).await?;
    assert_eq!(commands, vec![("sub-otlp".to_string(), root.trace_id.clone())]);

    let points = sink.points();
    for metric in
        ["topup_records_consumed", "topup_records_produced", "topup_command_latency_seconds"]
    {
        assert!(
            points.iter().any(|(service, name, _)| name == metric && service == "topup-evaluator"),
            "no {metric} among {points:?}"
        );
    }
    child.kill().await?;
    Ok(())
}

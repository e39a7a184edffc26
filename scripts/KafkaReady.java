// Readiness probe for the Kafka cluster that scripts/kafka starts.
//
//   java -cp "libs/*:probe" KafkaReady <bootstrap.servers> <timeout-ms> [expected-brokers]
//
// Exits 0 once the cluster can do what the project needs from it, 1 with a message on
// stderr otherwise. "Ready" means, within <timeout-ms> from the probe's start:
//   1. the cluster reports at least [expected-brokers] brokers (default: the number of
//      addresses in <bootstrap.servers>);
//   2. the probe topic exists (created here, 1 partition, replication min(3, brokers));
//   3. a transactional producer initialises, begins, sends one record and commits;
//   4. a consumer joins a new group and reads that record with read_committed, then
//      commits its offset.
// Steps 2 and 3 and the group coordinator's start overlap (the internal topics
// __transaction_state and __consumer_offsets are created on first use), to be quick.
// A port that merely answers is not "ready": the transaction coordinator, the group
// coordinator and their internal topics must all work.
//
// Built by `scripts/kafka fetch` with javac against the kafka-clients jar of the cache.

import java.time.Duration;
import java.util.Collections;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.CloseOptions;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public final class KafkaReady {
    static final String TOPIC = "topup-ready-probe";

    private final String bootstrap;
    private final long deadlineNanos;
    private final int expectedBrokers;
    private String step = "starting";

    private KafkaReady(String bootstrap, long timeoutMs, int expectedBrokers) {
        this.bootstrap = bootstrap;
        this.deadlineNanos = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeoutMs);
        this.expectedBrokers = expectedBrokers;
    }

    public static void main(String[] args) {
        if (args.length < 2 || args.length > 3) {
            System.err.println("usage: KafkaReady <bootstrap.servers> <timeout-ms> [expected-brokers]");
            System.exit(2);
        }
        String bootstrap = args[0];
        long timeoutMs = Long.parseLong(args[1]);
        int expected = args.length == 3
                ? Integer.parseInt(args[2])
                : bootstrap.split(",").length;
        KafkaReady probe = new KafkaReady(bootstrap, timeoutMs, expected);
        long t0 = System.nanoTime();
        try {
            probe.run();
            System.out.printf("KafkaReady: ready in %d ms (%s)%n",
                    TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - t0), bootstrap);
            System.exit(0);
        } catch (Throwable e) {
            Throwable cause = e instanceof ExecutionException && e.getCause() != null ? e.getCause() : e;
            System.err.printf("KafkaReady: NOT ready after %d ms: step '%s' failed: %s%n",
                    TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - t0), probe.step, cause);
            System.exit(1);
        }
    }

    private long remainingMs() {
        long ms = TimeUnit.NANOSECONDS.toMillis(deadlineNanos - System.nanoTime());
        if (ms <= 0) {
            throw new IllegalStateException("deadline passed");
        }
        return ms;
    }

    private static void pause(long ms) throws InterruptedException {
        Thread.sleep(ms);
    }

    private void run() throws Exception {
        String value = "ready-" + UUID.randomUUID();
        String group = "topup-ready-probe-" + UUID.randomUUID();
        // Closed with short timeouts on success only: on failure the process exits at once
        // (a default close() could wait on an unreachable broker past the deadline).
        Admin admin = Admin.create(adminProps());
        int brokers = waitForBrokers(admin);
        int replication = Math.min(3, brokers);
        KafkaProducer<String, String> producer = new KafkaProducer<>(producerProps());
        // The transaction coordinator (and __transaction_state) comes up while the topic
        // is created; asking for the group's offsets starts the group coordinator (and
        // __consumer_offsets) meanwhile too.
        CompletableFuture<Void> init = CompletableFuture.runAsync(producer::initTransactions);
        admin.listConsumerGroupOffsets(group).all();
        createTopic(admin, replication);
        CompletableFuture<Void> read = CompletableFuture.runAsync(() -> consume(group, value));
        step = "initTransactions";
        join(init);
        step = "beginTransaction";
        producer.beginTransaction();
        step = "send to " + TOPIC;
        producer.send(new ProducerRecord<>(TOPIC, "ready", value));
        step = "commitTransaction";
        producer.commitTransaction();
        step = "consumer group join and read_committed read of the committed record";
        join(read);
        producer.close(Duration.ofSeconds(2));
        admin.close(Duration.ofSeconds(2));
        System.out.printf("KafkaReady: topic %s replication %d, transaction committed, group read it%n",
                TOPIC, replication);
    }

    private void join(CompletableFuture<Void> f) throws Exception {
        try {
            f.get(remainingMs(), TimeUnit.MILLISECONDS);
        } catch (ExecutionException e) {
            Throwable c = e.getCause();
            if (c instanceof java.util.concurrent.CompletionException && c.getCause() != null) {
                c = c.getCause();
            }
            throw c instanceof Exception ? (Exception) c : new ExecutionException(c);
        } catch (java.util.concurrent.TimeoutException e) {
            throw new IllegalStateException("deadline passed");
        }
    }

    private Properties adminProps() {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        p.put(AdminClientConfig.RETRY_BACKOFF_MS_CONFIG, "100");
        p.put(AdminClientConfig.RECONNECT_BACKOFF_MS_CONFIG, "50");
        p.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");
        return p;
    }

    private int waitForBrokers(Admin admin) throws InterruptedException {
        step = "wait for " + expectedBrokers + " broker(s) to register";
        while (true) {
            long wait = Math.min(remainingMs(), 5000);
            try {
                List<Node> nodes = List.copyOf(admin.describeCluster().nodes().get(wait, TimeUnit.MILLISECONDS));
                if (nodes.size() >= expectedBrokers) {
                    return nodes.size();
                }
                step = "wait for " + expectedBrokers + " broker(s) to register (have " + nodes.size() + ")";
            } catch (java.util.concurrent.TimeoutException | ExecutionException e) {
                // not up yet
            }
            remainingMs();
            pause(100);
        }
    }

    private void createTopic(Admin admin, int replication) throws InterruptedException {
        step = "create topic " + TOPIC + " (replication " + replication + ")";
        while (true) {
            long wait = Math.min(remainingMs(), 10000);
            try {
                NewTopic t = new NewTopic(TOPIC, 1, (short) replication);
                admin.createTopics(Collections.singleton(t)).all().get(wait, TimeUnit.MILLISECONDS);
                return;
            } catch (ExecutionException e) {
                if (e.getCause() instanceof TopicExistsException) {
                    return;
                }
                // e.g. not enough brokers yet, controller moving: try again
            } catch (java.util.concurrent.TimeoutException e) {
                // try again
            }
            remainingMs();
            pause(200);
        }
    }

    private Properties producerProps() {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, "topup-ready-probe-" + UUID.randomUUID());
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.TRANSACTION_TIMEOUT_CONFIG, "60000");
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, Long.toString(remainingMs()));
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, Long.toString(Math.max(remainingMs(), 30000)));
        p.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, "10000");
        p.put(ProducerConfig.LINGER_MS_CONFIG, "0");
        p.put(ProducerConfig.RETRY_BACKOFF_MS_CONFIG, "100");
        p.put(ProducerConfig.RECONNECT_BACKOFF_MS_CONFIG, "50");
        p.put(ProducerConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        return p;
    }

    // Runs on its own thread (the consumer stays confined to it).
    private void consume(String group, String value) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        p.put(ConsumerConfig.METADATA_MAX_AGE_CONFIG, "500");
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.REQUEST_TIMEOUT_MS_CONFIG, "10000");
        p.put(ConsumerConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        p.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, "10000");
        p.put(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, "1000");
        p.put(ConsumerConfig.RETRY_BACKOFF_MS_CONFIG, "100");
        p.put(ConsumerConfig.RECONNECT_BACKOFF_MS_CONFIG, "50");
        p.put(ConsumerConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        KafkaConsumer<String, String> consumer = new KafkaConsumer<>(p);
        consumer.subscribe(Collections.singleton(TOPIC));
        while (true) {
            long wait = Math.min(remainingMs(), 500);
            for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(wait))) {
                if (value.equals(r.value())) {
                    consumer.commitSync(Duration.ofMillis(remainingMs()));
                    consumer.close(CloseOptions.timeout(Duration.ofSeconds(2)));
                    return;
                }
            }
        }
    }
}

// Formats the storage of several nodes in one JVM (one JVM start instead of one per node):
//   java -cp "libs/*:probe" KafkaFormat <cluster-id> <node.properties>[@standalone]...
// Each argument runs `kafka-storage format -t <cluster-id> -c <node.properties>`, with
// --standalone when it ends in @standalone (a controller starting a one-voter quorum).
final class KafkaFormat {
    public static void main(String[] args) {
        if (args.length < 2) {
            System.err.println("usage: KafkaFormat <cluster-id> <node.properties>[@standalone]...");
            System.exit(2);
        }
        for (int i = 1; i < args.length; i++) {
            String props = args[i];
            boolean standalone = props.endsWith("@standalone");
            if (standalone) {
                props = props.substring(0, props.length() - "@standalone".length());
            }
            String[] cmd = standalone
                    ? new String[] {"format", "-t", args[0], "-c", props, "--standalone"}
                    : new String[] {"format", "-t", args[0], "-c", props};
            int rc;
            try {
                rc = kafka.tools.StorageTool.execute(cmd, System.out);
            } catch (Throwable e) {
                System.err.println("KafkaFormat: formatting " + props + " failed: " + e);
                rc = 1;
            }
            if (rc != 0) {
                System.err.println("KafkaFormat: formatting " + props + " failed (exit " + rc + ")");
                System.exit(1);
            }
        }
        System.exit(0);
    }
}

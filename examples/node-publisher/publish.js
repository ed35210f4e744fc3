// Publish one amqp-jobs job from Node.js, following the README's wire contract
// (protocol version 1) and the job's JSON Schema in schemas/.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ AMQP_JOBS_NAMESPACE=shop \
//     node publish.js emails.send_welcome '{"user_id": 1, "email": "a@b.c"}' emails [delay_ms]
//
// Prints the job id once the broker has confirmed the job.
"use strict";
const amqp = require("amqplib");
const crypto = require("crypto");

async function main() {
  const [job, argsJson, queue, delayMs] = process.argv.slice(2);
  if (!job || !argsJson || !queue) {
    console.error("usage: node publish.js JOB_NAME ARGS_JSON QUEUE [DELAY_MS]");
    process.exit(2);
  }
  const url = process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/";
  const namespace = process.env.AMQP_JOBS_NAMESPACE || "shop";
  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createConfirmChannel();
    let returned = null;
    channel.on("return", (msg) => {
      returned = msg.fields.replyText;
    });
    const jobId = crypto.randomUUID().replace(/-/g, "");
    const headers = { "job-protocol": 1, "job-attempt": 1, "job-queue": queue };
    if (delayMs) {
      // epoch milliseconds; amqplib sends a whole number as an integer, as required
      headers["job-eta"] = Date.now() + Math.round(Number(delayMs));
    }
    const body = Buffer.from(JSON.stringify(JSON.parse(argsJson)), "utf8");
    channel.publish(`${namespace}.jobs`, job, body, {
      contentType: "application/json",
      deliveryMode: 2,
      messageId: jobId,
      type: job,
      timestamp: Math.floor(Date.now() / 1000),
      mandatory: true,
      headers,
    });
    await channel.waitForConfirms();
    if (returned) {
      throw new Error(`unroutable: ${returned} (is the queue declared?)`);
    }
    console.log(jobId);
    await channel.close();
  } finally {
    await connection.close();
  }
}

main().catch((err) => {
  console.error(`publish failed: ${err.message}`);
  process.exit(1);
});

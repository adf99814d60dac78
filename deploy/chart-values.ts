// The Helm chart's values: every setting, its default and what it means, in one place.
// scripts/gen-chart.js writes charts/lockstep/values.yaml (defaults, with these
// descriptions as comments) and values.schema.json (what helm checks every install against)
// from it; a test keeps both current.
import { z } from 'zod';

const quantity = z.union([z.string().regex(/^[0-9.]+[a-zA-Z]*$/), z.number()]);
const resources = z.strictObject({
  requests: z.record(z.string(), quantity).default({}),
  limits: z.record(z.string(), quantity).default({}),
});
/** Kubernetes objects passed through as the user wrote them (the API server checks them). */
const passThrough = z.record(z.string(), z.unknown());
const placement = {
  nodeSelector: z
    .record(z.string(), z.string())
    .default({})
    .describe('Node labels the pods must match.'),
  tolerations: z.array(passThrough).default([]).describe('Taints the pods tolerate.'),
  affinity: passThrough.default({}).describe('Pod affinity and anti-affinity rules.'),
};
const port = z.number().int().min(1).max(65535);
const duration = z.string().regex(/^([0-9]+(ms|s|m|h))+$/, 'a duration such as 90s, 30m or 24h');
const absolutePath = z.string().regex(/^\/.+/, 'an absolute path');

export const chartValues = z.strictObject({
  image: z
    .strictObject({
      repository: z.string().min(1).default('lockstep').describe('Image repository.'),
      tag: z.string().default('').describe('Image tag; empty: the chart’s appVersion.'),
      digest: z
        .string()
        .regex(/^(sha256:[0-9a-f]{64})?$/)
        .default('')
        .describe('Pin the image by digest (sha256:…); used instead of the tag when set.'),
      pullPolicy: z.enum(['Always', 'IfNotPresent', 'Never']).default('IfNotPresent'),
    })
    .prefault({})
    .describe('The lockstep image (npm run image builds it): one image for every component.'),
  imagePullSecrets: z
    .array(z.strictObject({ name: z.string() }))
    .default([])
    .describe('Secrets for pulling the image from a private registry.'),
  crds: z
    .strictObject({
      install: z
        .boolean()
        .default(true)
        .describe(
          'Install and upgrade the CRDs with the chart. They are kept on uninstall (deleting ' +
            'a CRD deletes every relationship and snapshot object of its kind).',
        ),
    })
    .prefault({}),
  logLevel: z
    .enum(['trace', 'debug', 'info', 'warn', 'error'])
    .default('info')
    .describe('Log level of every component (JSON logs on stdout).'),
  kubernetesServiceHost: z
    .string()
    .default('')
    .describe(
      'The API server address every pod uses, for clusters without kube-proxy, where the ' +
        '`kubernetes` Service’s IP leads nowhere (as Cilium’s k8sServiceHost); empty: the ' +
        'Service’s, which the kubelet gives every pod.',
    ),
  kubernetesServicePort: z
    .number()
    .int()
    .min(1)
    .max(65535)
    .default(443)
    .describe('The API server port that goes with kubernetesServiceHost.'),
  tls: z
    .strictObject({
      mode: z
        .enum(['operator', 'certManager', 'existingSecret'])
        .default('operator')
        .describe(
          'Where the Lockstep CA comes from. operator: the operator makes it (Secret ' +
            'tls.caSecret, if missing) and signs each agent’s request for its own node’s ' +
            'certificate. certManager: cert-manager issues the CA into tls.caSecret (a ' +
            'self-signed Issuer and a CA Certificate are installed); the operator signs ' +
            'with it. existingSecret: the kubernetes.io/tls Secret tls.caSecret, which you ' +
            'made (lockstep certs init), is the CA.',
        ),
      caSecret: z
        .string()
        .regex(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/, 'a Secret name')
        .default('lockstep-ca')
        .describe('The CA Secret (kubernetes.io/tls) in the release namespace.'),
      certificateLifetime: duration
        .default('24h')
        .describe('How long the certificates the operator issues are valid (renewed at 2/3).'),
    })
    .prefault({})
    .describe('Mutual TLS between every component (always on; see docs/SECURITY.md).'),
  operator: z
    .strictObject({
      replicas: z
        .number()
        .int()
        .min(1)
        .default(2)
        .describe('Operator replicas: one leads (Lease), all share failure monitoring.'),
      monitorShards: z
        .number()
        .int()
        .min(1)
        .default(4)
        .describe('Shards the relationships are monitored in, spread over the replicas.'),
      agentPollMs: z
        .number()
        .int()
        .min(100)
        .default(1000)
        .describe('How often each agent’s replication state is read (ms).'),
      metricsPort: port.default(8080),
      resources: resources.default({
        requests: { cpu: '50m', memory: '128Mi' },
        limits: { memory: '512Mi' },
      }),
      ...placement,
    })
    .prefault({}),
  agent: z
    .strictObject({
      dataDir: absolutePath
        .default('/var/lib/lockstep')
        .describe(
          'Host directory of the agent’s state and of replica copies made without a PVC.',
        ),
      socketDir: absolutePath
        .default('/run/lockstep')
        .describe(
          'Host directory of the NBD socket (nbd.sock) through which workloads on the node ' +
            'reach their volumes.',
        ),
      volumeHostPaths: z
        .array(absolutePath)
        .default(['/opt/local-path-provisioner'])
        .describe(
          'Host directories under which the PersistentVolumes that Lockstep serves live ' +
            '(local or hostPath PVs); each is mounted into the agent at the same path.',
        ),
      port: port.default(7400).describe('gRPC port (control and replication).'),
      dataPort: port.default(7401).describe('Replication data lanes.'),
      metricsPort: port.default(9400),
      peerTimeoutMs: z
        .number()
        .int()
        .min(100)
        .default(5000)
        .describe('A replicated write unacknowledged this long fails the peer link.'),
      priorityClassName: z
        .string()
        .default('')
        .describe('e.g. system-node-critical, so that agents are not evicted before workloads.'),
      terminationGracePeriodSeconds: z
        .number()
        .int()
        .min(1)
        .default(60)
        .describe('Time to drain in-flight writes and flush on stop.'),
      resources: resources.default({
        requests: { cpu: '100m', memory: '128Mi' },
        limits: { memory: '1Gi' },
      }),
      ...placement,
    })
    .prefault({}),
  mediator: z
    .strictObject({
      enabled: z
        .boolean()
        .default(false)
        .describe(
          'Run a mediator (failover tiebreaker) in this cluster. It belongs in a third ' +
            'failure domain: pin it there with nodeSelector or affinity.',
        ),
      port: port.default(7450),
      persistence: z
        .strictObject({
          enabled: z
            .boolean()
            .default(true)
            .describe('Keep its records on a PVC (an emptyDir loses them with the pod).'),
          size: z.string().default('1Gi'),
          storageClass: z.string().default('').describe('Empty: the cluster default.'),
        })
        .prefault({}),
      resources: resources.default({
        requests: { cpu: '20m', memory: '64Mi' },
        limits: { memory: '256Mi' },
      }),
      ...placement,
    })
    .prefault({}),
  monitoring: z
    .strictObject({
      serviceMonitor: z
        .boolean()
        .default(true)
        .describe('A ServiceMonitor for the operator (only if the cluster has the API).'),
      podMonitor: z
        .boolean()
        .default(true)
        .describe('A PodMonitor for the agents (only if the cluster has the API).'),
      prometheusRule: z
        .boolean()
        .default(true)
        .describe(
          'The alerts (files/alerts.yaml) as a PrometheusRule (only if the cluster has the API).',
        ),
      dashboard: z
        .boolean()
        .default(true)
        .describe(
          'The Grafana dashboard, as a ConfigMap labelled grafana_dashboard: "1" (what ' +
            'Grafana’s dashboard sidecar loads).',
        ),
      labels: z
        .record(z.string(), z.string())
        .default({})
        .describe('Extra labels on the monitors, e.g. what a Prometheus selects them by.'),
    })
    .prefault({})
    .describe('Prometheus Operator integration (monitoring.coreos.com/v1).'),
});

export type ChartValues = z.output<typeof chartValues>;

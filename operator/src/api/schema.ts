// Small builders for OpenAPI v3 structural schemas, so the CRD definitions read like the API.
export type Schema = Record<string, unknown>;

export const str = (description: string, extra: Schema = {}): Schema => ({
  type: 'string',
  description,
  ...extra,
});
export const int = (description: string, extra: Schema = {}): Schema => ({
  type: 'integer',
  description,
  ...extra,
});
export const num = (description: string, extra: Schema = {}): Schema => ({
  type: 'number',
  description,
  ...extra,
});
export const bool = (description: string): Schema => ({ type: 'boolean', description });
export const arr = (description: string, items: Schema, extra: Schema = {}): Schema => ({
  type: 'array',
  description,
  items,
  ...extra,
});
export const obj = (
  description: string,
  properties: Record<string, Schema>,
  extra: Schema = {},
): Schema => ({
  type: 'object',
  description,
  properties,
  ...extra,
});

/** A CEL rule (x-kubernetes-validations) with the message users see when it fails. */
export const rule = (expr: string, message: string, extra: Schema = {}): Schema => ({
  rule: expr,
  message,
  ...extra,
});

/** Standard status conditions (metav1.Condition), as `kubectl wait --for=condition=` expects. */
export const conditions: Schema = arr(
  'Latest observations of the object’s state (Ready, InSync, Degraded, Resyncing, SplitBrain).',
  obj(
    'A metav1.Condition.',
    {
      type: str('Condition type.', { maxLength: 316 }),
      status: str('True, False or Unknown.', { enum: ['True', 'False', 'Unknown'] }),
      observedGeneration: int('The spec generation this condition describes.', { minimum: 0 }),
      lastTransitionTime: str('When the status last changed.', { format: 'date-time' }),
      reason: str('CamelCase reason.', { maxLength: 1024 }),
      message: str('Human-readable details.', { maxLength: 32768 }),
    },
    { required: ['type', 'status', 'lastTransitionTime', 'reason', 'message'] },
  ),
  { 'x-kubernetes-list-type': 'map', 'x-kubernetes-list-map-keys': ['type'] },
);

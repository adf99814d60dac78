// Three suites: pure logic (unit), real processes and NBD clients (dataplane), and a real
// kube-apiserver + etcd shared by every file of the suite (k8s, started in global setup).
// Transpile only (type checking is `tsc`'s job in `npm run build`), to CommonJS.
const tsJest = [
  'ts-jest',
  {
    tsconfig: {
      module: 'commonjs',
      moduleResolution: 'node10',
      target: 'es2022',
      allowJs: true,
      isolatedModules: true,
      sourceMap: true,
    },
    diagnostics: false,
  },
];
// @kubernetes/client-node 1.x and a few of its dependencies are ES modules. Node >= 20.19 loads
// them with require(); jest's own module loader does not (before Node 24.9), so they are
// compiled to CommonJS for tests only.
const esmPackages = [
  '@kubernetes/client-node',
  'openid-client',
  'oauth4webapi',
  'jose',
  'jsonpath-plus',
  'rfc4648',
];
const common = {
  testEnvironment: 'node',
  transform: { '^.+\\.ts$': tsJest, '^.+\\.m?js$': tsJest },
  transformIgnorePatterns: [`/node_modules/(?!(${esmPackages.join('|')})/)`],
  moduleFileExtensions: ['ts', 'js', 'mjs', 'json'],
};

module.exports = {
  // Tests drive real processes; each bounds its own waits, this is the backstop.
  testTimeout: 120_000,
  // Two files at a time, even on two cores (jest would otherwise run them one by one): most of
  // a test's time is spent waiting on agents and NBD clients, and the suite takes 9 minutes
  // instead of 14. Nothing is shared between files but the k8s suite's control plane.
  maxWorkers: 2,
  projects: [
    { ...common, displayName: 'unit', testMatch: ['<rootDir>/test/unit/**/*.test.ts'] },
    { ...common, displayName: 'dataplane', testMatch: ['<rootDir>/test/dataplane/**/*.test.ts'] },
    {
      ...common,
      displayName: 'k8s',
      testMatch: ['<rootDir>/test/k8s/**/*.test.ts'],
      globalSetup: '<rootDir>/test/harness/k8s-global-setup.ts',
      globalTeardown: '<rootDir>/test/harness/k8s-global-teardown.ts',
    },
  ],
};
